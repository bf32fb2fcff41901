"""The papers' table (`msa-search report DIR --protocol paper|reference-lnln`) and seed groups
(`msa-search train --seeds`): tables equal a hand computation from the Parquet rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_pipeline.errors import MsaSearchError
from models.metrics import METRIC_NAMES
from search.config import ConfigError, load_config
from search.layout import Layout
from search.protocol import RunRows, build_table, paper_epoch, protocol_table
from search.protocol_render import to_markdown
from search.results import ResultsStore, RunInfo
from search.seed_group import parse_seeds, read_group, resume_group, train_group

ROOT = Path(__file__).resolve().parents[2]
RATES = [f"intra:{r / 10:.1f}" for r in range(10)]
GRID = [*RATES, "intra:1.0", "inter:L"]  # 1.0 and inter:L are in no average
EPOCHS = 3
SEEDS = (1111, 1112)
# Planted: valid f1_non0 (the objective, robust_f1) peaks at epoch 1 for 1111 and 2 for 1112,
# test peaks elsewhere, so a choice on test or at the last epoch gives other numbers.
VALID_BOOST = {1111: (0.0, 0.3, 0.1), 1112: (0.0, 0.1, 0.3)}
TEST_BOOST = {1111: (0.3, 0.0, 0.1), 1112: (0.3, 0.1, 0.0)}
# Test at intra:0.5, per epoch: what the reference code selects on (seed 1111; 1112 random).
AT_HALF = {"acc2_has0": (0.70, 0.75, 0.75),  # a tie keeps the earlier epoch: 1
           "acc2_non0": (0.70, 0.60, 0.80),  # 2
           "acc5": (0.50, 0.50, 0.50),  # never strictly better: 0
           "acc7": (0.30, 0.30004, 0.30),  # better only before rounding to 4 decimals: 0
           "mae": (0.90, 0.80, 0.85)}  # lower is better: 1
REFERENCE_1111 = {"acc2_has0": 1, "f1_has0": 1, "acc2_non0": 2, "f1_non0": 2, "acc5": 0, "acc7": 0,
                  "mae": 1, "corr": 1}


def _config(seed: int, out: Path):
    grid = "[" + ", ".join(GRID) + "]"
    return load_config(ROOT / "configs" / "quick.yaml", [f"missing.eval_grid={grid}", f"train.epochs={EPOCHS}",
                                                         f"train.seed={seed}", f"output.dir={out}"])


def _metrics(rng, seed: int, epoch: int, split: str, pattern: str) -> dict[str, float]:
    values = {m: float(rng.uniform(0.5, 1.5) if m == "mae" else rng.uniform(0.3, 0.6)) for m in METRIC_NAMES}
    boost = (VALID_BOOST if split == "valid" else TEST_BOOST)[seed][epoch]
    values["f1_non0"] += boost
    if split == "test" and pattern == "intra:0.5" and seed == 1111:
        values.update({m: v[epoch] for m, v in AT_HALF.items()})
    return values


def write_run(run_dir: Path, seed: int, rng) -> None:
    """A run directory as `msa-search train` leaves it: config.yaml and results/ (real schema)."""
    cfg = _config(seed, run_dir)
    layout = Layout(run_dir)
    layout.root.mkdir(parents=True)
    layout.config.write_text(cfg.to_yaml())
    store, run = ResultsStore(layout.results), RunInfo.of(run_dir.name, run_dir.name, cfg)
    for epoch in range(EPOCHS):
        results = {split: {p: _metrics(rng, seed, epoch, split, p) for p in GRID} for split in ("valid", "test")}
        store.append(run, epoch, results, wall_time_s=float(epoch))


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> Path:
    """A 2-seed group as `train --seeds 1111,1112` leaves it."""
    root = tmp_path_factory.mktemp("protocol") / "group"
    rng = np.random.default_rng(0)
    root.mkdir()
    Layout(root).seed_group.write_text(json.dumps({"seeds": list(SEEDS)}))
    for seed in SEEDS:
        write_run(Layout(root).seed_run(seed), seed, rng)
    return root


def _rows(group: Path, seed: int) -> pd.DataFrame:
    return ResultsStore(Layout(group).seed_run(seed) / "results").read()


def _rate_mean(rows: pd.DataFrame, epoch: int, metric: str) -> float:
    test = rows[(rows.split == "test") & (rows.epoch == epoch) & rows.pattern.isin(RATES)]
    assert len(test) == 10
    return float(test[metric].mean())


def _hand_paper_epoch(rows: pd.DataFrame, cfg) -> int:
    valid = rows[(rows.split == "valid") & rows.pattern.isin(cfg.search.objective_patterns)]
    robust_f1 = valid.groupby("epoch").f1_non0.mean()
    return int(robust_f1.idxmax())


def test_paper_table_equals_a_hand_computation_from_the_parquet_rows(group):
    table = build_table(group, "paper")
    per_seed = {}
    for seed in SEEDS:
        rows = _rows(group, seed)
        epoch = _hand_paper_epoch(rows, _config(seed, group))
        assert epoch == {1111: 1, 1112: 2}[seed], "the planted valid peak"
        per_seed[seed] = {m: _rate_mean(rows, epoch, m) for m in METRIC_NAMES}
    summary = table.summary().set_index("entry").loc["group"]
    assert summary["runs"] == 2 and summary["seeds"] == "1111, 1112"
    for metric in METRIC_NAMES:
        values = [per_seed[s][metric] for s in SEEDS]
        assert summary[metric] == pytest.approx(np.mean(values), abs=1e-12), metric
        assert summary[f"{metric}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12), metric
    assert [r.epochs["f1_non0"] for r in table.runs] == [1, 2]
    # The test peak and the last epoch give other numbers: the check would notice a wrong choice.
    wrong = [np.mean([_rate_mean(_rows(group, s), e, "f1_non0") for s in SEEDS]) for e in (0, EPOCHS - 1)]
    assert all(abs(w - summary["f1_non0"]) > 0.01 for w in wrong)
    assert "best on the valid split by robust_f1" in table.criterion
    page = to_markdown(table)
    mean, std = np.mean([per_seed[s]["f1_non0"] for s in SEEDS]), np.std([per_seed[s]["f1_non0"] for s in SEEDS],
                                                                        ddof=1)
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in page
    mae = [per_seed[s]["mae"] for s in SEEDS]
    assert f"{np.mean(mae):.4f} ± {np.std(mae, ddof=1):.4f}" in page


def test_reference_lnln_selects_per_metric_on_test_at_half_and_says_so(group):
    table = build_table(group, "reference-lnln")
    first = table.runs[0]
    assert first.seed == 1111 and first.epochs == REFERENCE_1111
    rows = _rows(group, 1111)
    for metric, epoch in REFERENCE_1111.items():
        assert first.values[metric] == pytest.approx(_rate_mean(rows, epoch, metric), abs=1e-12), metric
    page = to_markdown(table)
    assert "selected on the TEST split at r = 0.5" in page and "not a clean protocol" in page
    assert "group seed-1111: acc5, acc7 best at the first epoch, where the reference code saves no checkpoint" in page
    assert "acc2_has0 1, acc2_non0 2, acc5 0, acc7 0, mae 1" in page


def test_a_run_diverged_from_the_start_gives_nan_and_says_why(group):
    rows = _rows(group, 1111)
    rows.loc[rows.split == "valid", "f1_non0"] = np.nan
    cfg = _config(1111, group)
    assert paper_epoch(rows, "robust_f1", cfg.search.objective_patterns) is None
    table = protocol_table([RunRows("g", "seed-1111", cfg, rows)], "paper", group, "seed group")
    assert np.isnan(table.summary().acc5.iloc[0])
    assert any("no epoch has a finite objective" in n for n in table.notes)
    assert "none (diverged)" in to_markdown(table)


def test_a_single_run_and_a_short_grid_are_labelled(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, 1111, np.random.default_rng(1))
    store = ResultsStore(run_dir / "results")
    df = store.read()
    table = build_table(run_dir, "paper")
    summary = table.summary().iloc[0]
    epoch = _hand_paper_epoch(df, _config(1111, run_dir))
    assert summary["f1_non0"] == pytest.approx(_rate_mean(df, epoch, "f1_non0"))
    assert np.isnan(summary["f1_non0_std"])
    assert any("no standard deviation" in n for n in table.notes)
    assert "Text missing simulated on features" in " ".join(table.notes)


def _make_experiment(root: Path) -> None:
    """An experiment as `tune` leaves it (a real Optuna study; trials t-good and t-bad)."""
    import optuna

    cfg = _config(1111, root)
    layout = Layout(root)
    root.mkdir()
    layout.config.write_text(cfg.to_yaml())
    optuna.create_study(study_name=layout.study_name, storage=layout.optuna_storage)
    rng = np.random.default_rng(2)
    for trial_id, shift in (("t-bad", -0.2), ("t-good", 0.0)):
        run = RunInfo.of(root.name, trial_id, cfg)
        for epoch in range(EPOCHS):
            results = {split: {p: {m: v + (shift if m == "f1_non0" else 0.0)
                                   for m, v in _metrics(rng, 1111, epoch, split, p).items()} for p in GRID}
                       for split in ("valid", "test")}
            ResultsStore(layout.results).append(run, epoch, results, 0.0)


def test_an_experiment_gives_one_row_per_exported_trial(tmp_path):
    exp = tmp_path / "exp"
    _make_experiment(exp)
    table = build_table(exp, "paper", top=2)
    assert [r.run for r in table.runs] == ["t-good", "t-bad"], "export's ranking"
    assert list(table.summary().entry) == ["t-good (rank 1)", "t-bad (rank 2)"]
    df = ResultsStore(exp / "results").read()
    rows = df[df.trial_id == "t-good"]
    epoch = _hand_paper_epoch(rows, _config(1111, exp))
    assert table.runs[0].values["acc5"] == pytest.approx(_rate_mean(rows, epoch, "acc5"))
    assert any("One seed per trial" in n for n in table.notes)
    assert len(build_table(exp, "paper").runs) == 1, "export's default: the best trial"


# --- through the command line ---

@pytest.fixture
def cli_run(msa_cli):
    return msa_cli


def test_report_writes_the_table_in_the_format_its_extension_names(group, tmp_path, cli_run):
    for name in ("t.md", "t.csv", "t.html"):
        code, out, err = cli_run("report", str(group), "--protocol", "paper", "--out", str(tmp_path / name))
        assert code == 0, err
        assert f"wrote {tmp_path / name}" in out and "1111, 1112" in out
    csv = pd.read_csv(tmp_path / "t.csv")
    expected = build_table(group, "paper").summary()
    assert csv.f1_non0.iloc[0] == pytest.approx(expected.f1_non0.iloc[0], abs=1e-12)
    assert "<table>" in (tmp_path / "t.html").read_text()
    code, out, err = cli_run("report", str(group), "--protocol", "reference-lnln")
    assert code == 0 and (group / "table-reference-lnln.md").is_file(), err


@pytest.mark.parametrize("args, message", [
    (["--protocol", "papers"], "'papers' is not one of"),
    (["--protocol", "paper", "--out", "t.txt"], ".md, .csv, .html"),
    (["--protocol", "paper", "--metric", "acc5"], "--metric is an option of --protocol search"),
    (["--protocol", "search"], "a seed group"),
])
def test_report_refuses_bad_input_with_exit_2(group, tmp_path, cli_run, args, message):
    code, _, err = cli_run("report", str(group), *args)
    assert code == 2 and message in err, err


def test_status_of_a_group_names_its_runs(group, cli_run):
    code, _, err = cli_run("status", str(group))
    assert code != 0 and "a seed group, not one run" in err and "seed-1111, seed-1112" in err, err


def test_report_of_a_directory_without_results_exits_2(tmp_path, cli_run):
    code, _, err = cli_run("report", str(tmp_path), "--protocol", "paper")
    assert code == 2 and "not a run, seed group or experiment" in err, err
    empty = tmp_path / "empty-group"
    empty.mkdir()
    Layout(empty).seed_group.write_text(json.dumps({"seeds": [1, 2]}))
    code, _, err = cli_run("report", str(empty), "--protocol", "paper")
    assert code == 2 and "no results yet" in err, err


def test_seed_lists_are_checked_before_anything_is_written(tmp_path, cli_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for seeds, message in (("1111,1111", "seeds must be distinct; 1111"), ("1111,x", "'x' is not an integer"),
                           ("1111,-3", "non-negative")):
        code, _, err = cli_run("train", "--config", str(ROOT / "configs" / "quick.yaml"), "--seeds", seeds,
                               "--set", "output.dir=g")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [], "nothing written"
    assert parse_seeds(" 1, 2 ,3") == [1, 2, 3]


# --- the group runner, with a stand-in for training ---

def _fake_train(fail: set[int], config_error: bool = False, killed_in: int | None = None, after: int = 1):
    """Writes a run's config and its epochs' rows; `killed_in`: that seed's process dies after
    `after` epochs (as Ctrl-C or a crash would stop the whole group)."""
    def train_one(cfg, resume=None) -> str:
        assert resume is None, "a new group starts every run anew"
        if cfg.train.seed in fail and config_error:
            raise ConfigError("refused")
        Path(cfg.output.dir).mkdir(parents=True)
        (Path(cfg.output.dir) / "config.yaml").write_text(cfg.to_yaml())
        if cfg.train.seed in fail:
            raise RuntimeError("loss is nan")
        run = RunInfo.of("g", Path(cfg.output.dir).name, cfg)
        for epoch in range(cfg.train.epochs):
            if cfg.train.seed == killed_in and epoch == after:
                raise KeyboardInterrupt
            ResultsStore(Path(cfg.output.dir) / "results").append(run, epoch, {"valid": {"intra:0.0": {"f1_non0": 0.5}}},
                                                                  1.0)
        return f"done {cfg.train.seed}"
    return train_one


def test_a_failing_seed_keeps_the_finished_ones_and_is_named(tmp_path):
    cfg = load_config(ROOT / "configs" / "quick.yaml", [f"output.dir={tmp_path / 'g'}", "train.seeds=[1, 2, 3]"])
    said = []
    with pytest.raises(MsaSearchError, match=r"seed 2 failed \(seed 2: loss is nan\); finished: 1, 3"):
        train_group(cfg, _fake_train({2}), say=said.append)
    assert said[0] == f"seed 1 (1/3): {tmp_path / 'g' / 'seed-1'}" and "done 3" in said
    assert read_group(tmp_path / "g").seeds == [1, 2, 3]
    run = load_config(tmp_path / "g" / "seed-3" / "config.yaml")
    assert run.train.seed == 3 and run.train.seeds == [], "each run retrains alone"
    with pytest.raises(MsaSearchError, match="not empty"):
        train_group(cfg, _fake_train(set()), say=said.append)


def test_a_stopped_group_resumes_its_unfinished_run_and_starts_the_seeds_not_started(tmp_path):
    cfg = load_config(ROOT / "configs" / "quick.yaml", [f"output.dir={tmp_path / 'g'}", "train.seeds=[1, 2, 3]",
                                                        "train.epochs=2", "train.lr=0.0007"])
    with pytest.raises(KeyboardInterrupt):
        train_group(cfg, _fake_train(set(), killed_in=2), say=lambda line: None)
    assert not (tmp_path / "g" / "seed-3").exists()
    calls, said = [], []

    def train_one(seed_cfg, resume) -> str:
        calls.append((seed_cfg, resume))
        return "trained"

    resume_group(read_group(tmp_path / "g"), train_one, say=said.append)
    (none, resumed), (started, nothing) = calls
    assert none is None and resumed == tmp_path / "g" / "seed-2", "seed 2 goes on from its checkpoint"
    assert nothing is None and started.train.seed == 3 and started.output.dir == str(tmp_path / "g" / "seed-3")
    assert started.train.lr == 0.0007 and started.train.seeds == [], "the group's settings, one seed"
    assert said[:2] == [f"seed 1 (1/3): {tmp_path / 'g' / 'seed-1'}", "ran all its epochs already: kept as it is"]


def test_a_seed_stopped_in_its_first_epoch_starts_anew_when_its_group_resumes(tmp_path):
    cfg = load_config(ROOT / "configs" / "quick.yaml", [f"output.dir={tmp_path / 'g'}", "train.seeds=[1, 2]",
                                                        "train.epochs=2"])
    with pytest.raises(KeyboardInterrupt):
        train_group(cfg, _fake_train(set(), killed_in=2, after=0), say=lambda line: None)
    seed_2 = tmp_path / "g" / "seed-2"
    (seed_2 / "leftover").write_text("from the stopped first epoch")
    calls = []

    def train_one(seed_cfg, resume) -> str:
        calls.append((seed_cfg.train.seed, resume, seed_2.exists()))
        return "trained"

    resume_group(read_group(tmp_path / "g"), train_one, say=lambda line: None)
    assert calls == [(2, None, False)], "no checkpoint to go on from: trained anew, in a clean directory"


def test_a_group_where_nothing_started_is_removed(tmp_path):
    cfg = load_config(ROOT / "configs" / "quick.yaml", [f"output.dir={tmp_path / 'g'}", "train.seeds=[1, 2]"])
    with pytest.raises(ConfigError, match="refused"):
        train_group(cfg, _fake_train({1}, config_error=True), say=lambda line: None)
    assert not (tmp_path / "g").exists()


QUICK = ["--set", "data.scale=0.05", "--set", "train.epochs=2", "--set", "model.hidden_dim=16",
         "--set", "model.dim_head=8", "--set", "model.num_heads=2", "--set", "model.mlp_dim=16",
         "--set", "model.lnln.tokens=2", "--set", "missing.eval_grid=[intra:0.0, intra:0.5, intra:0.9]"]


def test_train_seeds_then_report_paper_end_to_end(tmp_path, cli_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli_run("train", "--config", str(ROOT / "configs" / "quick.yaml"), *QUICK,
                             "--seeds", "1111,1112", "--set", "output.dir=g")
    assert code == 0, err
    assert "seed 1111 (1/2)" in err and "seed 1112 (2/2)" in err and "--protocol paper" in out
    group = tmp_path / "g"
    assert read_group(group).seeds == [1111, 1112]
    for seed in (1111, 1112):
        run = Layout(group).seed_run(seed)
        assert load_config(run / "config.yaml").train.seed == seed
        assert ResultsStore(run / "results").read().epoch.nunique() == 2
    code, out, err = cli_run("report", "g", "--protocol", "paper", "--out", "t.md")
    assert code == 0, err
    page = (tmp_path / "t.md").read_text()
    assert "intra rates 0.0, 0.5, 0.9 only" in page and "| g | 1111, 1112 |" in page
    code, _, err = cli_run("train", "--config", str(ROOT / "configs" / "quick.yaml"), *QUICK,
                           "--seeds", "1111,1112", "--set", "output.dir=g")
    assert code == 1 and "not empty" in err, "an existing group is refused"
