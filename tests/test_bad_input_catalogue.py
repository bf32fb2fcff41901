"""The bad-input catalogue (issue 15): every class of bad input a user can give, through the real
command line, ends with exit != 0 and ONE line on stderr that names the file, split, key or
option, what was expected and what was found; nothing under the working directory changes (no
partial output, an existing output kept), nothing changes in Grafana, and Ray never starts.

Each case breaks one thing in otherwise good input (a tiny synthetic dataset, quick.yaml).
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from data_pipeline.invariants import DataWarning
from fake_grafana import FakeGrafana, serve
from data_pipeline.mmsa import to_mmsa_dict
from data_pipeline.store import write_store
from data_pipeline.synth import synthesize
from search import cli

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quick.yaml")
PICKLE = "aligned_50.pkl"  # MOSI, aligned: labels in [-3, 3], every sequence 50 long


@pytest.fixture(scope="module")
def good_raw() -> dict:
    """A valid MMSA pickle's dict (13 / 4 / 7 samples)."""
    return to_mmsa_dict(synthesize("mosi-aligned", seed=2, scale=0.01))


@pytest.fixture(scope="module")
def good_dataset():
    return synthesize("mosi-aligned", seed=3, scale=0.01)


def _closed_port() -> int:
    with socket.socket() as s:  # free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the cases -------------------------------------------------------------------------------

@dataclass
class Env:
    """What a case builds its bad input from; `fmt` fills the placeholders of its `names`."""
    tmp: Path
    raw: dict
    dataset: object
    grafana: FakeGrafana | None = None
    server: ThreadingHTTPServer | None = None
    fmt: dict = field(default_factory=dict)

    def pickle(self, change: Callable[[dict], object] | None = None, data: bytes | None = None) -> list[str]:
        """`data convert` of the good pickle changed by `change`, over an existing output (--force)."""
        raw = copy.deepcopy(self.raw)
        if change is not None:
            change(raw)
        path = self.tmp / PICKLE
        path.write_bytes(data if data is not None else pickle.dumps(raw))
        (self.tmp / "out").mkdir()
        (self.tmp / "out" / "keep.txt").write_text("an earlier dataset")
        return ["data", "convert", str(path), "--out", str(self.tmp / "out"), "--force"]

    def store(self, split: str, column: str, change: Callable[[np.ndarray], np.ndarray]) -> list[str]:
        """`train` on a Parquet store (data.path) whose `column` of `split` was changed."""
        store = write_store(self.dataset, self.tmp / "store")
        path = store / f"{split}.parquet"
        table = pq.read_table(path)
        values = change(table.column(column).to_numpy(zero_copy_only=False).copy())
        index = table.column_names.index(column)
        pq.write_table(table.set_column(index, column, pa.array(values, table.schema.field(column).type)), path)
        return self.train(f"data.path={store}", "output.dir=run")

    def train(self, *overrides: str, command: str = "train") -> list[str]:
        return [command, "--config", QUICK, *(a for o in overrides for a in ("--set", o))]


def _set(split, key, value):
    def change(raw):
        raw[split][key] = value(raw[split][key]) if callable(value) else value
    return change


def _at(index, value):
    def change(arr):
        arr = np.array(arr, copy=True)
        arr[index] = value
        return arr
    return change


def _truncated(env: Env) -> list[str]:
    data = pickle.dumps(env.raw)
    return env.pickle(data=data[: len(data) // 2])


def _empty_test_split(raw):
    raw["test"] = {key: value[:0] for key, value in raw["test"].items()}


def _leak(raw):
    raw["test"]["id"] = _at(0, raw["train"]["id"][0])(raw["test"]["id"])


def _store_leak(env: Env) -> list[str]:
    first_train_id = env.dataset.splits["train"].ids[0]
    return env.store("valid", "id", _at(0, first_train_id))


def _not_a_directory(env: Env, command: str) -> list[str]:
    (env.tmp / "afile").write_text("a file where a directory is expected")
    if command == "convert":
        (env.tmp / PICKLE).write_bytes(pickle.dumps(env.raw))
        return ["data", "convert", str(env.tmp / PICKLE), "--out", str(env.tmp / "afile" / "out")]
    if command == "dashboards":
        return ["dashboards", "build", "--out", str(env.tmp / "afile" / "out")]
    return env.train(f"output.dir={env.tmp / 'afile' / 'run'}", command=command)


def _directory_as_file(env: Env, command: str) -> list[str]:
    """An output file named by an existing directory (with --force, which replaces files)."""
    (env.tmp / "adir").mkdir()
    (env.tmp / "adir" / "keep.txt").write_text("kept")
    if command == "export":
        return ["export", str(env.tmp / "exp"), "--out", str(env.tmp / "adir")]
    return ["data", "synth", "--preset", "mosi", "--scale", "0.01", "--format", "mmsa-pkl", "--out",
            str(env.tmp / "adir"), "--force"]


def _read_only_dir(env: Env) -> list[str]:
    (env.tmp / "ro").mkdir(mode=0o555)
    return env.train(f"output.dir={env.tmp / 'ro' / 'run'}")


def _resumed(env: Env, command: str, *given: str) -> list[str]:
    """An existing run or experiment resumed with config options too."""
    (env.tmp / "exp").mkdir()
    (env.tmp / "exp" / "config.yaml").write_text("# the config it started with\n")
    return [command, "--resume", str(env.tmp / "exp"), *given]


def _grafana_unreachable(env: Env) -> list[str]:
    env.fmt["url"] = f"http://127.0.0.1:{_closed_port()}"
    return ["dashboards", "push", "--url", env.fmt["url"], "--timeout", "5"]


def _prometheus_absent(env: Env) -> list[str]:
    env.grafana = FakeGrafana(prometheus_up=None)  # its health check queries the data source's URL
    env.server, _ = serve(env.grafana)
    env.fmt["url"] = f"http://127.0.0.1:{env.server.server_address[1]}"
    env.fmt["prometheus"] = f"http://127.0.0.1:{_closed_port()}"
    return ["dashboards", "push", "--url", env.fmt["url"], "--prometheus-url", env.fmt["prometheus"]]


TB = "key 'text_bert'"
# class -> (bad input, exit code, what the line must name: where, what was expected, what was found)
CATALOGUE: dict[str, tuple[Callable[[Env], list[str]], int, tuple[str, ...]]] = {
    # MMSA pickle, one key or split at a time (`msa-search data convert`)
    "truncated pickle": (_truncated, 1, ("{tmp}/aligned_50.pkl", "expected a readable pickle", "truncated")),
    "missing key": (lambda e: e.pickle(lambda r: r["valid"].pop("audio")), 1,
                    ("{tmp}/aligned_50.pkl", "split 'valid'", "key 'audio'", "required key", "found keys [")),
    "wrong dims": (lambda e: e.pickle(_set("test", "audio", lambda a: a[:, :, :3])), 1,
                   ("split 'test'", "key 'audio'", "expected (N, 50, 5) as in split 'train'", "found (N, 50, 3)")),
    "NaN features": (lambda e: e.pickle(_set("valid", "vision", _at((1, 2, 3), np.nan))), 1,
                     ("split 'valid'", "key 'vision'", "finite values", "found nan at index (1, 2, 3)")),
    "labels out of range": (lambda e: e.pickle(_set("train", "regression_labels", _at(4, 3.5))), 1,
                            ("split 'train'", "key 'regression_labels'", "within [-3, 3]", "found range [")),
    "empty split": (lambda e: e.pickle(_empty_test_split), 1,
                    ("split 'test'", "key 'regression_labels'", "a non-empty split", "found 0 samples")),
    "lengths beyond the sequence": (lambda e: e.pickle(_set("train", "audio_lengths", _at(2, 51))), 1,
                                    ("split 'train'", "key 'audio_lengths'", "within [0, 50]", "found range [")),
    "raw_text count": (lambda e: e.pickle(_set("valid", "raw_text", lambda a: a[:-1])), 1,
                       ("split 'valid'", "key 'raw_text'", "4 transcripts", "found 3")),
    # invariants across keys and splits, which later stages rely on
    "no non-zero label to score": (lambda e: e.pickle(_set("valid", "regression_labels", np.zeros_like)), 1,
                                   ("split 'valid'", "key 'regression_labels'", "at least one non-zero label",
                                    "all 4 labels 0")),
    "attention mask not a prefix": (lambda e: e.pickle(_set("train", "text_bert", _at((3, 1, 0), 0))), 1,
                                    ("split 'train'", TB, "ones then zeros", "a 0 before a 1 in sample 3")),
    "negative token id": (lambda e: e.pickle(_set("test", "text_bert", _at((2, 0, 5), -7))), 1,
                          ("split 'test'", TB, "token ids (row 0) >= 0", "found -7 in sample 2")),
    "token type not 0/1": (lambda e: e.pickle(_set("train", "text_bert", _at((0, 2, 1), 2))), 1,
                           ("split 'train'", TB, "token types (row 2) of 0/1", "found values 2")),
    # a Parquet store named by data.path: checked as it is read (`msa-search train`)
    "store: NaN label": (lambda e: e.store("test", "label", _at(1, np.nan)), 1,
                         ("{tmp}/store/test.parquet", "split 'test'", "key 'label'", "finite", "found nan")),
    "store: text lengths disagree with the mask": (lambda e: e.store("train", "text_length", lambda a: a - 1), 1,
                                                   ("{tmp}/store/train.parquet", "key 'text_length'",
                                                    "sums of text_bert's attention mask", "in sample 0")),
    # config (`train` / `tune` with --set): refused before anything starts
    "unknown model": (lambda e: e.train("model.name=bert", command="tune"), 2,
                      ("config key 'model.name'", "unknown model 'bert'", "registered: hrlf, lnln")),
    "negative loss weight": (lambda e: e.train("model.loss_weights.completeness=-0.5", command="tune"), 2,
                             ("config key 'model.loss_weights.completeness'", "completeness=-0.5", ">= 0")),
    "empty search space": (lambda e: e.train("search.space={train.lr: {choice: []}}", command="tune"), 2,
                           ("config key 'search.space.train.lr'", "at least one value", "got {{'choice': []}}")),
    "empty search range": (lambda e: e.train("search.space={train.lr: {uniform: [0.1, 0.01]}}", command="tune"), 2,
                           ("config key 'search.space.train.lr'", "low <= high", "got [0.1, 0.01]")),
    "more workers than CPUs": (lambda e: e.train("train.workers=4096", command="tune"), 2,
                               ("config key 'train.workers'", "4096 workers x train.cpus_per_worker 1 need 4096 CPUs",
                                "but the Ray cluster has")),
    "PBT over Ray Train trials": (lambda e: e.train("search.scheduler=pbt", "train.workers=1", command="tune"), 2,
                                  ("config key 'search.scheduler'", "pbt needs in-process trials",
                                   "train.workers: 0, got 1")),
    # --resume goes on with the config its run or experiment started with
    "--set with --resume (tune)": (lambda e: _resumed(e, "tune", "--set", "search.num_samples=8"), 2,
                                   ("--resume {tmp}/exp", "the config it started with ({tmp}/exp/config.yaml)",
                                    "--set search.num_samples=8 would be ignored")),
    "--config with --resume (train)": (lambda e: _resumed(e, "train", "--config", QUICK), 2,
                                       ("--resume {tmp}/exp", f"--config {QUICK} would be ignored")),
    # outputs and services
    "unwritable output dir (tune)": (lambda e: _not_a_directory(e, "tune"), 2,
                                     ("config key 'output.dir'", "a directory this user can write",
                                      "found {tmp}/afile is a file, not a directory")),
    "unwritable output dir (train)": (lambda e: _not_a_directory(e, "train"), 2,
                                      ("config key 'output.dir'", "found {tmp}/afile is a file")),
    "unwritable output dir (convert)": (lambda e: _not_a_directory(e, "convert"), 1,
                                        ("{tmp}/afile/out", "expected an output in a writable directory",
                                         "found {tmp}/afile is a file")),
    "a directory for an output file (export)": (lambda e: _directory_as_file(e, "export"), 1,
                                                ("{tmp}/adir: a directory, and this output is a file", "name a file")),
    "a directory for an output file (synth)": (lambda e: _directory_as_file(e, "synth"), 1,
                                               ("{tmp}/adir: a directory, and this output is a file",)),
    "unwritable output dir (dashboards build)": (lambda e: _not_a_directory(e, "dashboards"), 1,
                                                 ("{tmp}/afile/out", "expected a directory this user can write",
                                                  "found {tmp}/afile is a file")),
    "unwritable output dir (read-only)": (_read_only_dir, 2, ("config key 'output.dir'", "{tmp}/ro is not writable")),
    "Grafana unreachable": (_grafana_unreachable, 1, ("cannot reach Grafana at {url}", "Connection refused")),
    "Prometheus absent": (_prometheus_absent, 1,
                          ("--prometheus-url '{prometheus}'", "expected a Prometheus that Grafana at {url} can query",
                           "Connection refused", "nothing was changed")),
}
NEEDS_NON_ROOT = {"unwritable output dir (read-only)"}  # root writes into a 0o555 directory


@pytest.fixture
def run_cli(monkeypatch, capsys, tmp_path):
    """`msa-search ARGS` in this process, in tmp_path, with Ray's start-up made to fail loudly."""
    def never(*args, **kwargs):
        raise AssertionError("Ray was started for an input that should have been refused")

    monkeypatch.setattr(ray, "init", never)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("GRAFANA_TOKEN", "glsa_catalogue_test_token")  # pragma: allowlist secret
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # loopback servers are reached directly
    monkeypatch.chdir(tmp_path)

    def run(args: list[str]) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["msa-search", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        return exit_info.value.code, capsys.readouterr().err

    return run


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` with its mode, size and modification time."""
    return {str(p.relative_to(root)): (s.st_mode, s.st_size, s.st_mtime_ns)
            for p in sorted(root.rglob("*")) for s in [p.lstat()]}


@pytest.mark.parametrize("case", [pytest.param(name, marks=pytest.mark.skipif(
    name in NEEDS_NON_ROOT and os.geteuid() == 0, reason="root may write into a read-only directory"))
    for name in CATALOGUE])
def test_bad_input_is_refused_with_one_line_and_no_output(case, run_cli, tmp_path, good_raw, good_dataset):
    make, code, names = CATALOGUE[case]
    env = Env(tmp_path, good_raw, good_dataset)
    args = make(env)
    before = _snapshot(tmp_path)
    try:
        exit_code, err = run_cli(args)
    finally:
        if env.server is not None:
            env.server.shutdown()
            env.server.server_close()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert name.format(tmp=tmp_path, **env.fmt) in lines[0], (name, lines[0])
    assert exit_code == code, lines[0]
    assert _snapshot(tmp_path) == before, "no partial output, an existing output kept"
    if env.grafana is not None:
        assert env.grafana.folders == env.grafana.datasources == env.grafana.dashboards == {}, "Grafana unchanged"
    print(f"{case}: {lines[0]}")  # the catalogue's table: pytest -s shows every class with its line


def test_the_good_input_of_the_catalogue_converts(run_cli, tmp_path, good_raw):
    """The cases above break one thing each in input that is otherwise accepted."""
    env = Env(tmp_path, good_raw, None)
    code, err = run_cli(env.pickle())
    assert code is None or code == 0, err
    assert (tmp_path / "out" / "schema.json").is_file()


# Suspect but usable: warned about, and the data is used (a published dataset with a repeated
# id must stay usable; a repeated id only repeats a mask).
WARNED = {
    "id twice in a split": (lambda e: e.pickle(_set("train", "id", _at(1, "mosi-aligned_train_00000"))),
                            ("split 'train'", "key 'id'", "unique sample ids", "in samples 0 and 1")),
    "id in two splits": (lambda e: e.pickle(_leak), ("split 'test'", "key 'id'", "ids not in split 'train'",
                                                     "1 shared")),
    "store: id in two splits": (_store_leak, ("{tmp}/store", "split 'valid'", "key 'id'", "not in split 'train'")),
}


@pytest.mark.parametrize("case", list(WARNED))
def test_suspect_ids_are_warned_about_and_the_data_is_used(case, run_cli, tmp_path, good_raw, good_dataset):
    make, names = WARNED[case]
    env = Env(tmp_path, good_raw, good_dataset)
    with pytest.warns(DataWarning) as caught:
        run_cli(make(env))
    message = str(caught[0].message)
    for name in names:
        assert name.format(tmp=tmp_path, **env.fmt) in message, (name, message)
    assert "used as it is" in message


def test_catalogue_has_every_class_the_issue_names():
    required = {"truncated pickle", "missing key", "wrong dims", "NaN features", "labels out of range", "empty split",
                "unknown model", "negative loss weight", "empty search space", "Grafana unreachable",
                "Prometheus absent"}
    assert required <= set(CATALOGUE) and any(name.startswith("unwritable output dir") for name in CATALOGUE)
    assert len(CATALOGUE) >= 14


def test_tune_on_bad_data_leaves_no_experiment_directory(run_cli, tmp_path, good_raw):
    env = Env(tmp_path, good_raw, None)
    env.pickle(_set("valid", "vision", _at((1, 2, 3), np.nan)))
    code, err = run_cli(env.train(f"data.path={tmp_path / PICKLE}", "output.dir=exp", command="tune"))
    assert code == 1 and "split 'valid'" in err and "key 'vision'" in err
    assert not (tmp_path / "exp").exists()
