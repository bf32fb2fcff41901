"""`msa-search report`: one self-contained HTML file, drawn from a real results store and a
real Optuna study in optuna.db (built here without Ray: parameters sampled by Optuna,
synthetic metrics that follow one of them), checked as text, through the CLI and in headless
Chromium with the network blocked."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.errors import MsaSearchError
from data_pipeline.missing import parse_pattern
from models.metrics import metric_names
from models.space import Dist
from search import report, report_data
from search.config import load_config
from search.layout import Layout
from search.objective import objective_value
from search.report_data import load_inputs
from search.results import ResultsStore, RunInfo
from search.space import space_to_data

ROOT = Path(__file__).resolve().parents[2]
# Ray-like trial ids; one all digits, which a plotly axis would read as a number.
TRIAL_IDS = ("3f2a9c01", "77c0e1d2", "12345678", "b0d4e6f8", "9e8d7c6b", "0a1b2c3d")
MULTI = ["f1_non0@intra:0.0", "robust_f1"]
PLOTLY_BANNER = "* plotly.js v"  # the head comment of the plotly.js bundle
NETWORK_REF = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.I)


# --- a small experiment, as `msa-search tune` would leave it ---

def _optuna_distribution(dist: Dist):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if dist.kind == "choice":
        return CategoricalDistribution(dist.choices)
    if dist.kind == "int":
        return IntDistribution(int(dist.low), int(dist.high))
    return FloatDistribution(dist.low, dist.high, log=dist.kind == "loguniform")


def _metrics(cfg, quality: float, pattern: str, epoch: int, split: str, trade: float = 0.0) -> dict[str, float]:
    """Synthetic metrics: better trials and later epochs score higher, missing data lower
    (losing text hurts most), test a little below valid; `trade` moves score from the
    missing patterns to the complete one (a trade-off for a multi-objective search)."""
    p = parse_pattern(pattern)
    drop = 0.4 * p.rate if p.kind == "intra" else 0.05 * len(p.dropped) + (0.2 if "L" in pattern.split(":")[1] else 0)
    f1 = 0.45 + 0.35 * quality + 0.03 * epoch - drop - (0.02 if split == "test" else 0.0)
    f1 += trade if pattern == "intra:0.0" else -trade / 2
    return {name: (1.2 - f1 if name == "mae" else f1) for name in metric_names(cfg.data.preset)}


def _epoch_results(cfg, quality: float, epoch: int, trade: float = 0.0) -> dict:
    return {split: {p: _metrics(cfg, quality, p, epoch, split, trade) for p in cfg.missing.eval_grid}
            for split in ("valid", "test")}


def trial_ids(n: int) -> list[str]:
    return list(TRIAL_IDS[:n]) + [f"{0xc0ffee00 + i:08x}" for i in range(len(TRIAL_IDS), n)]


def make_experiment(root: Path, objectives: list[str] | None = None, trials: int = 6) -> dict:
    """A finished search in `root`; returns each trial's objective(s) (valid, last epoch)."""
    import optuna

    overrides = [f"output.dir={root}"] + ([f"search.objectives={json.dumps(objectives)}", "search.scheduler=none"]
                                          if objectives else [])
    cfg = load_config(ROOT / "configs/quick.yaml", overrides)
    layout = Layout(root)
    root.mkdir(parents=True)
    layout.config.write_text(cfg.to_yaml())
    space = cfg.search_space()
    layout.space.write_text(json.dumps(space_to_data(space)))
    distributions = {key: _optuna_distribution(d) for key, d in space.items()}
    names = objectives or [cfg.search.objective]
    # Sampled in memory (asking an SQLite study commits every parameter), then stored at once.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), directions=["maximize"] * len(names))
    store, told = ResultsStore(layout.results), {}
    layout.trial_params_dir.mkdir()
    for n, trial_id in enumerate(trial_ids(trials)):
        trial = study.ask(distributions)
        layout.trial_params(trial_id).write_text(json.dumps(trial.params))
        # What the trial reaches depends on what it sampled, so importance has something to find.
        quality = trial.params["model.loss_weights.completeness"] / 1.5
        trade = trial.params["model.dropout"] if objectives else 0.0
        epochs = cfg.train.epochs if n % 2 == 0 else 1 + n % 3  # some stopped early, as ASHA does
        run = RunInfo.of(root.name, trial_id, cfg.with_params(trial.params))
        for epoch in range(epochs):
            results = _epoch_results(cfg, quality, epoch, trade)
            store.append(run, epoch, results, wall_time_s=10.0 * n + 4.0 * epoch)
        values = [objective_value(results["valid"], name, cfg.search.objective_patterns) for name in names]
        study.tell(trial, values)
        told[trial_id] = values[0] if not objectives else values
    study.tell(study.ask(distributions), state=optuna.trial.TrialState.FAIL)  # one errored trial
    stored = optuna.create_study(study_name=layout.study_name, storage=layout.optuna_storage,
                                 directions=study.directions)
    stored.add_trials(study.trials)
    return told


def make_train_run(root: Path) -> None:
    """What `msa-search train` leaves: config.yaml and results/, no study."""
    cfg = load_config(ROOT / "configs/quick.yaml", [f"output.dir={root}"])
    layout = Layout(root)
    root.mkdir(parents=True)
    layout.config.write_text(cfg.to_yaml())
    run = RunInfo.of(root.name, root.name, cfg)
    for epoch in range(cfg.train.epochs):
        ResultsStore(layout.results).append(run, epoch, _epoch_results(cfg, 0.5, epoch), wall_time_s=5.0 * (epoch + 1))


@pytest.fixture(scope="module")
def search_exp(tmp_path_factory):
    root = tmp_path_factory.mktemp("search") / "exp"
    return root, make_experiment(root)


@pytest.fixture(scope="module")
def search_page(search_exp) -> str:
    """The search's report, as `msa-search report EXP` writes it (EXP/report.html)."""
    return report.write_report(search_exp[0]).read_text()


@pytest.fixture(scope="module")
def multi_exp(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi") / "multi"
    return root, make_experiment(root, MULTI)


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "run"
    make_train_run(root)
    return root


def sections(page: str) -> dict[str, str]:
    """section id -> its HTML."""
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', page, re.S))


# --- the page ---

def test_report_embeds_plotly_once_and_loads_nothing_from_the_network(search_page):
    page = search_page
    assert page.count(PLOTLY_BANNER) == 1
    assert not NETWORK_REF.findall(page)
    assert "mathjax" not in page.lower().split("<body>")[1]  # no MathJax loader after the embedded bundle


def test_report_has_every_section_with_held_out_patterns_marked(search_exp, search_page):
    told, page = search_exp[1], search_page
    shown = sections(page)
    assert list(shown) == [s.anchor for s in report.SECTIONS]
    for anchor in ("robustness", "patterns", "progress", "hyperparameters", "importance", "pattern-importance"):
        assert f'id="figure-{anchor}"' in shown[anchor], anchor
    assert "does not apply to a single-objective search" in shown["pareto"]
    assert page.count('class="plotly-graph-div"') == 6
    for held in ("intra:0.9*", "inter:L+V*"):
        assert held in shown["patterns"] and held in shown["pattern-importance"]
    assert "intra:0.8*" not in page
    best = max(told, key=told.get)
    assert re.search(rf"{best} at epoch \d: robust_f1 \(valid\) = {told[best]:.4f}", page)
    assert "lnln on mosi-aligned" in page and "6 complete, 1 fail" in page
    assert "Text missing simulated on features" in shown["robustness"], "features-mode curves are marked"


def test_views_show_the_trials_the_store_holds(search_exp):
    root, told = search_exp
    inputs = load_inputs(root)
    fig, _ = report.pattern_heatmap(inputs)
    assert list(fig.data[0].y) == sorted(told, key=told.get, reverse=True)  # best first
    assert len(fig.data[0].x) == 16
    curves, _ = report.robustness_curves(inputs)
    assert len(curves.data) == 2 * len(TRIAL_IDS) and list(curves.data[0].x) == [i / 10 for i in range(10)]
    progress, _ = report.best_so_far(inputs)
    running = list(progress.data[1].y)
    assert running == sorted(running) and running[-1] == pytest.approx(max(told.values()))
    coords, _ = report.parallel_coordinates(inputs)
    labels = [d.label for d in coords.data[0].dimensions]
    assert "log10 train.lr" in labels and "adversarial.schedule" in labels and labels[-1] == "robust_f1"
    importance, _ = report.pattern_importance_map(inputs)
    assert importance.data[0].z.shape == (len(inputs.study.trials[0].distributions), 16)


def test_importance_finds_the_hyperparameter_the_metrics_follow(tmp_path):
    """The synthetic metrics rise with the completeness weight alone (and epochs): with enough
    trials for PED-ANOVA's top quantile, it must come first overall and on every pattern."""
    make_experiment(tmp_path / "big", trials=24)
    inputs = load_inputs(tmp_path / "big")
    overall, _ = report.importance_bars(inputs)
    assert overall.data[0].y[-1] == "model.loss_weights.completeness"  # bars: the first is drawn at the bottom
    table, n = report_data.pattern_importance(inputs)
    assert n == 24 and (table.idxmax() == "model.loss_weights.completeness").all()


def test_multi_objective_report_draws_the_pareto_front(multi_exp, tmp_path):
    root, told = multi_exp
    inputs = load_inputs(root)
    fig, _ = report.pareto(inputs)
    dominated = {t for t, v in told.items()
                 if any(all(o >= x for o, x in zip(w, v)) and w != v for w in told.values())}
    front = next(trace for trace in fig.data if trace.name == "Pareto front")
    assert set(front.text) == set(told) - dominated and len(dominated) < len(told) - 1  # a real trade-off
    page = report.write_report(root, tmp_path / "r.html").read_text()
    assert page.count('class="plotly-graph-div"') == len(report.SECTIONS)


def test_train_run_report_explains_the_sections_it_cannot_show(train_run, tmp_path):
    page = report.write_report(train_run, tmp_path / "r.html").read_text()
    shown = sections(page)
    for anchor in ("robustness", "patterns", "progress"):
        assert f'id="figure-{anchor}"' in shown[anchor], anchor
    assert "one trial only" in shown["hyperparameters"]
    for anchor in ("importance", "pattern-importance"):
        assert "no Optuna study (no optuna.db): a `msa-search train` run has none" in shown[anchor]
    assert "does not apply" in shown["pareto"]
    assert "training run (msa-search train)" in page


def test_an_existing_report_is_replaced_atomically(search_exp, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("old report")
    with out.open() as old:  # a reader holding the old file keeps reading all of it
        report.write_report(search_exp[0], out)
        assert old.read() == "old report"
    assert out.read_text().count(PLOTLY_BANNER) == 1
    with pytest.raises(MsaSearchError, match="--metric"):  # a render that fails leaves the last report
        report.write_report(search_exp[0], out, metric="nope")
    assert out.read_text().count(PLOTLY_BANNER) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left behind


def test_watch_rerenders_and_waits_for_the_first_results(tmp_path):
    root = tmp_path / "exp"
    cfg = load_config(ROOT / "configs/quick.yaml", [f"output.dir={root}"])
    root.mkdir()
    Layout(root).config.write_text(cfg.to_yaml())
    lines, epochs = [], iter(range(3))

    def next_epoch(seconds):  # between renders, the run reports an epoch
        ResultsStore(Layout(root).results).append(RunInfo.of("exp", "run", cfg), next(epochs),
                                                  _epoch_results(cfg, 0.5, 0), wall_time_s=1.0)

    report.watch_report(root, interval_s=0, on_render=lines.append, max_renders=3, sleep=next_epoch)
    assert len(lines) == 3 and "waiting:" in lines[0] and "no results yet" in lines[0]
    assert all(f"wrote {Layout(root).report} (1 trial;" in line for line in lines[1:])
    assert '<meta http-equiv="refresh"' in Layout(root).report.read_text()  # an open tab follows the watch


# --- the command line ---

def test_cli_writes_the_default_path(train_run, msa_cli):
    code, out, err = msa_cli("report", str(train_run))
    assert code == 0 and out.strip() == f"wrote {Layout(train_run).report}", err
    assert Layout(train_run).report.read_text().count(PLOTLY_BANNER) == 1


def test_cli_refuses_what_it_cannot_report_in_one_line(train_run, tmp_path, msa_cli):
    empty = tmp_path / "empty"  # an experiment that has not reported an epoch yet
    empty.mkdir()
    Layout(empty).config.write_text(Layout(train_run).config.read_text())
    for args, message in (([str(tmp_path / "nowhere")], "nowhere: not an experiment directory (no config.yaml)"),
                          ([str(empty)], "no results yet"),
                          ([str(train_run), "--metric", "acc9"], "--metric acc9: not in the results")):
        code, out, err = msa_cli("report", *args)
        assert code == 1 and err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture
def ctrl_c_at_its_default():
    """Python's own Ctrl-C handler for the test. A suite started as a background job of a shell
    without job control (`nohup make test &` in a script) inherits Ctrl-C ignored, and a Python
    started so keeps it ignored, as do its children: these tests would then fail for how the
    suite was launched (seen 2026-11-29), not for the watch."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # children start at SIG_DFL
    yield
    signal.signal(signal.SIGINT, before)


def test_cli_watch_stops_cleanly_on_ctrl_c(train_run, tmp_path, ctrl_c_at_its_default):
    out = tmp_path / "watched.html"
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "report", str(train_run), "--out", str(out),
                             "--watch", "--interval", "0.2"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    try:
        first = proc.stdout.readline()
        assert f"wrote {out} (1 trial; best" in first, proc.stderr.read() if proc.poll() is not None else first
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert stdout.strip().endswith("stopped") and out.read_text().count(PLOTLY_BANNER) == 1


def test_a_ctrl_c_whose_interrupt_was_swallowed_still_ends_the_watch_at_its_next_sleep(ctrl_c_at_its_default):
    """Python raises Ctrl-C's KeyboardInterrupt in whatever code runs when the signal comes, and
    C code that clears every error can lose it. The watch's next sleep ends it all the same."""
    from search.cli import ctrl_c_latch

    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_latch() as sleep:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs here, raising
        except KeyboardInterrupt:
            pass  # swallowed, as that C code does
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            sleep(30)
        assert time.monotonic() - started < 1
        with pytest.raises(KeyboardInterrupt):
            sleep(0)  # still latched: every later sleep ends the watch too
    assert signal.getsignal(signal.SIGINT) is before
    # Started with Ctrl-C ignored (a shell's background job): it stays ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with ctrl_c_latch() as sleep:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and sleep is time.sleep
    finally:
        signal.signal(signal.SIGINT, before)


# --- in a browser, offline ---

def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.geteuid() != 0:
            pytest.skip("needs Debian's chromium: sudo apt-get install chromium (`make test` installs it as root)")
        pytest.fail("chromium is missing; `make system-packages` installs it (apt-get install chromium)")
    return path


@pytest.mark.integration
def test_every_figure_renders_offline_in_chromium_without_errors(multi_exp, tmp_path):
    from playwright.sync_api import sync_playwright

    path = report.write_report(multi_exp[0], tmp_path / "report.html")
    figures = path.read_text().count('class="plotly-graph-div"')
    assert figures == len(report.SECTIONS)
    errors, requested = [], []

    def only_files(route):
        requested.append(route.request.url)
        route.continue_() if route.request.url.startswith("file://") else route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.route("**/*", only_files)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
            page.goto(path.as_uri())
            page.wait_for_function("n => [...document.querySelectorAll('.js-plotly-plot')]"
                                   ".filter(d => d.querySelector('svg.main-svg')).length === n",
                                   arg=figures, timeout=15_000)
            page.screenshot(path=tmp_path / "report.png", full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert [u for u in requested if not u.startswith("file://")] == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
