"""A config the search cannot run is refused at the edge: exit 2, one line naming the key and
the bad value, nothing written, Ray never started (DESIGN.md, "Validate at the edge, once")."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray

from search import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_cli(monkeypatch, capsys, tmp_path):
    """Runs `msa-search ...` in this process with Ray's start-up made to fail loudly."""
    def never(*args, **kwargs):
        raise AssertionError("Ray was started for a config that should have been refused")

    monkeypatch.setattr(ray, "init", never)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # so that joining a running Ray fails too
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["msa-search", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        return exit_info.value.code, capsys.readouterr().err

    return run


@pytest.mark.parametrize("command", ["tune", "train"])
@pytest.mark.parametrize("override, key, named", [
    ("model.loss_weights.typo=1.0", "model.loss_weights.typo", ["typo=1.0", "completeness", "reconstruction"]),
    ("search.space={model.loss_weights.kd: {uniform: [0, 1]}}", "search.space.model.loss_weights.kd",
     ["'kd' is not a loss term", "sparsity"]),
    ("search.space={train.epochz: {int: [1, 3]}}", "search.space.train.epochz", ["train.epochz", "epochs"]),
    ("search.space={train.lr: {loguniform: [1e-3, 1e-5]}}", "search.space.train.lr",
     ["low <= high", "[0.001, 1e-05]"]),
    ("search.objective=f1_non0@intra:0.45", "search.objective", ["intra:0.45", "0.0, 0.1"]),
    ("search.objective=f1_non0@inter:L+A+V", "search.objective", ["inter:L+A+V", "leaves no input"]),
    ("search.objectives=[robust_f1, f1_non0@inter:L+A]", "search.objectives", ["inter:L+A", "not evaluated", "inter:A"]),
    ("model.name=bert", "model.name", ["'bert'", "hrlf, lnln"]),
])
def test_bad_config_exits_2_naming_the_key_before_anything_starts(run_cli, tmp_path, command, override, key, named):
    extra = []
    if override.startswith("search.objectives"):
        extra = ["--set", "missing.eval_grid=[complete, intra:0.5, inter:A]", "--set", "search.scheduler=none"]
    code, err = run_cli(command, "--config", str(ROOT / "configs" / "quick.yaml"), "--set", override,
                        "--set", "output.dir=exp", *extra)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"config key '{key}'" in lines[0], err
    for text in named:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "exp").exists() and list(tmp_path.iterdir()) == [], "nothing written"


def test_distributed_only_limits_are_refused_at_the_edge(run_cli, tmp_path):
    code, err = run_cli("train", "--config", str(ROOT / "configs" / "quick.yaml"), "--set", "train.workers=2",
                        "--set", "train.engine=ddp", "--set", "train.precision=fp16", "--set", "output.dir=run")
    assert code == 2 and "config key 'train.precision'" in err and "deepspeed" in err
    code, err = run_cli("tune", "--config", str(ROOT / "configs" / "hrlf_quick.yaml"),
                        "--set", "model.text_encoder=bert", "--set", "output.dir=exp")
    # HRLF reads token ids too (text_encoder bert), from a local BERT: none is given here.
    assert code == 2 and "config key 'model.bert_path'" in err and "local directory of BERT weights" in err, err
    assert list(tmp_path.iterdir()) == []


def test_gpu_settings_this_machine_cannot_run_are_refused_before_ray_starts(run_cli, tmp_path, monkeypatch):
    # A private local cluster would hold this machine's GPUs: none is visible here.
    monkeypatch.setattr("search.devices.visible_gpus", lambda: 0)
    monkeypatch.setattr("search.ray_setup.visible_gpus", lambda: 0)
    monkeypatch.setattr("search.tune.visible_gpus", lambda: 0)
    code, err = run_cli("tune", "--config", str(ROOT / "configs" / "quick.yaml"), "--set", "search.gpus_per_trial=0.25",
                        "--set", "output.dir=exp")
    assert code == 2 and "config key 'search.gpus_per_trial': 0.25 GPUs per trial" in err, err
    monkeypatch.setattr("search.distributed.visible_gpus", lambda: 0)
    code, err = run_cli("train", "--config", str(ROOT / "configs" / "quick.yaml"), "--set", "train.workers=1",
                        "--set", "train.device=cuda", "--set", "output.dir=run")
    assert code == 2 and "config key 'train.device': cuda" in err, err
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_an_address_where_no_cluster_answers_is_one_line_not_a_long_hang(run_cli, tmp_path):
    import socket
    import time

    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code, err = run_cli("tune", "--config", str(ROOT / "configs" / "quick.yaml"), "--address", f"127.0.0.1:{port}",
                        "--set", f"output.dir={tmp_path / 'exp'}")
    assert code == 1 and time.monotonic() - started < 30
    assert err.strip().splitlines() == [f"error: --address 127.0.0.1:{port}: no Ray cluster answers there "
                                        "(Connection refused); start one (`ray up`, `ray start --head`) or leave "
                                        "--address and RAY_ADDRESS unset for a private local cluster"]
    assert not (tmp_path / "exp").exists()
