"""`msa-search evaluate` and `msa-search train --init-from`, as a user runs them."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.synth import synthesize
from models.lnln_reference import to_reference
from models.registry import get_model
from search.config import load_config
from search.results import ResultsStore
from test_cli_train import ROOT, cli
from test_edge_validation import run_cli  # noqa: F401 (a fixture: the CLI in this process, Ray never started)

CONFIG = ROOT / "configs" / "lnln_quick.yaml"
TINY = ["data.scale=0.05", "model.hidden_dim=32", "model.dim_head=16", "model.num_heads=4", "model.lnln.tokens=4"]
SET = [arg for key in TINY for arg in ("--set", key)]
METRICS = ["f1_non0", "acc2_non0", "mae", "corr", "acc7"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A fresh (untrained) LNLN of the tiny config, saved as a plain state dict of ours and as
    the reference code saves one (its names, under 'state_dict')."""
    cfg = load_config(CONFIG, TINY)
    spec = synthesize(cfg.data.preset, seed=cfg.data.synth_seed, scale=cfg.data.scale).spec
    torch.manual_seed(3)
    state = get_model("lnln").build(cfg.model, spec).state_dict()
    root = tmp_path_factory.mktemp("checkpoints")
    torch.save(state, root / "fresh.pt")
    torch.save({"epoch": 1, "state_dict": to_reference(state), "optimizer": {}}, root / "reference.pth")
    return root


@pytest.fixture(scope="module")
def evaluated(checkpoints):
    r = cli("evaluate", "--checkpoint", str(checkpoints / "fresh.pt"), "--config", str(CONFIG), *SET,
            "--out", "ev", cwd=checkpoints)
    assert r.returncode == 0, r.stderr
    return r, ResultsStore(checkpoints / "ev" / "results").read()


def by_key(df):
    return df.sort_values(["split", "pattern"]).set_index(["split", "pattern"])[METRICS]


def test_evaluate_writes_every_pattern_on_valid_and_test(checkpoints, evaluated):
    r, df = evaluated
    assert len(df) == 16 * 2 and set(df.split) == {"valid", "test"} and df.pattern.nunique() == 16
    assert set(df.trial_id) == {"fresh"} and set(df.epoch) == {0} and set(df.model) == {"lnln"}
    assert not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any() and df.f1_non0.notna().all()
    assert (checkpoints / "ev" / "config.yaml").is_file()
    assert "inter:A+V" in r.stdout and "robust_f1" in r.stdout


def test_reference_checkpoint_evaluates_like_ours(checkpoints, evaluated):
    r = cli("evaluate", "--checkpoint", str(checkpoints / "reference.pth"), "--config", str(CONFIG), *SET,
            "--out", "ev-ref", cwd=checkpoints)
    assert r.returncode == 0, r.stderr
    df = ResultsStore(checkpoints / "ev-ref" / "results").read()
    assert set(df.trial_id) == {"reference"}
    assert by_key(df).equals(by_key(evaluated[1])), "the same weights under the reference's names"


@pytest.fixture(scope="module")
def init_run(checkpoints):
    """A one-epoch run started from the reference checkpoint: its directory."""
    # lr 1e-12: one epoch leaves the weights where they started, so its evaluation is the checkpoint's.
    r = cli("train", "--config", str(CONFIG), *SET, "--set", "train.epochs=1", "--set", "train.lr=1e-12",
            "--set", "output.dir=run", "--init-from", str(checkpoints / "reference.pth"), cwd=checkpoints)
    assert r.returncode == 0, r.stderr
    return checkpoints / "run"


def test_train_init_from_starts_at_the_checkpoint(init_run, evaluated):
    df = ResultsStore(init_run / "results").read()
    trained, start = by_key(df), by_key(evaluated[1])
    assert (trained.mae - start.mae).abs().max() < 1e-4 and (trained.f1_non0 == start.f1_non0).mean() > 0.9


def test_status_of_a_run_directory_says_what_it_is(init_run):
    r = cli("status", str(init_run), cwd=init_run.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("run directory (msa-search train or evaluate; no study): 1 epoch stored, "
                               "of train.epochs 1\n"), r.stdout  # not "study: no trials yet"
    assert "best so far: trial run epoch 0" in r.stdout


def test_a_runs_own_last_checkpoint_evaluates_to_its_last_epoch(init_run):
    # checkpoints/last.pt holds numpy's generator state too: read without running code all the same.
    # Named as a file:// URI (as tune's last line names an output.storage): taken as its path.
    r = cli("evaluate", "--checkpoint", f"file://{init_run / 'checkpoints' / 'last.pt'}", "--config",
            str(init_run / "config.yaml"), "--out", "ev-last", cwd=init_run.parent)
    assert r.returncode == 0, r.stderr
    df = ResultsStore(init_run.parent / "ev-last" / "results").read()
    assert set(df.trial_id) == {"last"}
    assert by_key(df).equals(by_key(ResultsStore(init_run / "results").read()))


def test_bad_checkpoints_and_configs_fail_with_one_line(checkpoints, run_cli, tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "optuna.db").touch()  # what marks a search's directory
    stored = tmp_path / "stored"  # a search whose trials live in output.storage (a file:// URI)
    stored.mkdir()
    (stored / "optuna.db").touch()
    (stored / "config.yaml").write_text(load_config(CONFIG, [*TINY, f"output.storage=file://{tmp_path}/store"]).to_yaml())
    fresh, reference = str(checkpoints / "fresh.pt"), str(checkpoints / "reference.pth")
    cases = [
        (["evaluate", "--checkpoint", "junk.pt", "--config", str(CONFIG), *SET], "not a PyTorch checkpoint"),
        (["evaluate", "--checkpoint", "absent.pt", "--config", str(CONFIG), *SET], "no such checkpoint file"),
        (["evaluate", "--checkpoint", str(checkpoints), "--config", str(CONFIG), *SET],
         "a directory without a checkpoint"),
        (["evaluate", "--checkpoint", str(tmp_path / "exp"), "--config", str(CONFIG), *SET],
         "a search; name one of its trials' directories"),
        (["evaluate", "--checkpoint", str(stored), "--config", str(CONFIG), *SET],
         f"({tmp_path}/store/stored/ray/tune*/*_<trial id>_*, its newest checkpoint, or {tmp_path}/store/stored/trials/"),
        (["evaluate", "--checkpoint", fresh, "--config", str(CONFIG), *SET, "--set", "model.hidden_dim=48"],
         "has shape"),
        (["evaluate", "--checkpoint", reference, "--config", str(ROOT / "configs" / "hrlf_quick.yaml"), *SET],
         "config builds model 'hrlf'"),
        (["train", "--config", str(CONFIG), *SET, "--set", "model.hidden_dim=48", "--set", "output.dir=out",
          "--init-from", fresh], "has shape"),
        (["train", "--config", str(CONFIG), "--resume", "somewhere", "--init-from", "junk.pt"], "--init-from starts"),
    ]
    for args, message in cases:
        code, err = run_cli(*args, *(["--out", "out"] if args[0] == "evaluate" else []))
        assert code == 1, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "out").exists(), "nothing is left of a run that could not start"
