"""The `msa-search data` commands, run as a user would (a subprocess, real files)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"})


def test_synth_convert_inspect_pipeline(tmp_path):
    r = cli("data", "synth", "--preset", "sims", "--out", "s.pkl", "--format", "mmsa-pkl", "--scale", "0.02",
            "--seed", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("data", "convert", "s.pkl", "--out", "s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("data", "inspect", "s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "sims: text 39x768, audio 400x33, vision 55x709, labels [-1, 1]" in out
    for split, n in (("train", 27), ("valid", 9), ("test", 9)):
        assert any(line.replace("│", " ").split()[:2] == [split, str(n)] for line in out.splitlines()), split
    assert "label histogram" in out
    # The pickle itself inspects the same, without converting it (nothing written).
    before = sorted(tmp_path.iterdir())
    r = cli("data", "inspect", "s.pkl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == out and sorted(tmp_path.iterdir()) == before
    # ... and back to an MMSA pickle: the same arrays as the pickle it came from.
    r = cli("data", "export", "s", "--format", "mmsa-pkl", "--out", "back.pkl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import pickle

    import numpy as np

    first, back = (pickle.loads((tmp_path / name).read_bytes()) for name in ("s.pkl", "back.pkl"))
    for split in ("train", "valid", "test"):
        assert set(first[split]) == set(back[split]), split
        for key, value in first[split].items():
            assert np.array_equal(np.asarray(value), np.asarray(back[split][key])), (split, key)
    refused = cli("data", "export", "s", "--out", "back.pkl", cwd=tmp_path)
    assert refused.returncode != 0 and "exists" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_synth_parquet_is_identical_for_the_same_seed(tmp_path):
    for name in ("a", "b"):
        assert cli("data", "synth", "--preset", "mosi-aligned", "--out", name, "--scale", "0.01", cwd=tmp_path).returncode == 0
    for split in ("train", "valid", "test"):
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() == (tmp_path / "b" / f"{split}.parquet").read_bytes()


def test_errors_are_one_line_without_traceback(tmp_path):
    r = cli("data", "synth", "--preset", "mosi", "--out", "x", "--scale", "-1", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("data", "inspect", "nowhere", cwd=tmp_path)
    assert r.returncode == 1 and "schema.json" in r.stderr and "nothing at that path" in r.stderr
    r = cli("data", "synth", "--preset", "imdb", "--out", "x", cwd=tmp_path)
    assert r.returncode == 2 and "imdb" in r.stderr


def test_error_text_with_brackets_is_printed_verbatim(tmp_path):
    r = cli("data", "inspect", "odd[/name]", cwd=tmp_path)
    assert r.returncode == 1 and "odd[/name]" in r.stderr and "Traceback" not in r.stderr
