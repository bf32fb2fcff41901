"""Benchmark: what publishing live metrics costs a search (issue goal: < 2% of wall time).

    python bench/live_metrics_overhead.py [--config configs/quick.yaml] [--rounds 3] [--set key=value ...]

Runs `msa-search tune` on the config with `output.live_metrics` on and off, interleaved
(on, off, on, off, ...) so drift on a shared machine hits both alike, each in a fresh
experiment directory and a fresh private Ray cluster, and prints `name=value` lines:
- wall_s_on / wall_s_off: median whole-command wall time, with _min / _max,
- trial_epochs_on / trial_epochs_off: epochs the trials ran (ASHA decides from arrival order,
  so a run may do a little more or less work; a fair comparison shows equal counts),
- overhead_pct: (median on - median off) / median off * 100.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.layout import Layout  # noqa: E402
from search.results import ResultsStore  # noqa: E402


def one_search(config: Path, overrides: list[str], live: bool, exp: Path) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "search.cli", "tune", "--config", str(config),
           "--set", f"output.dir={exp}", "--set", f"output.live_metrics={str(live).lower()}"]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"msa-search tune failed (live_metrics={live}):\n{done.stderr[-2000:]}")
    df = ResultsStore(Layout(exp).results).read()
    return wall, int(df.groupby("trial_id").epoch.nunique().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quick.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    walls: dict[bool, list[float]] = {True: [], False: []}
    epochs: dict[bool, list[int]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="live-overhead-") as tmp:
        for r in range(args.rounds):
            for live in (True, False):
                wall, n = one_search(args.config, args.overrides, live, Path(tmp) / f"r{r}-{'on' if live else 'off'}")
                walls[live].append(wall)
                epochs[live].append(n)
                print(f"# round {r} live_metrics={'on' if live else 'off'}: {wall:.1f} s, {n} trial-epochs",
                      flush=True)
    for live, name in ((True, "on"), (False, "off")):
        print(f"wall_s_{name}={statistics.median(walls[live]):.2f}")
        print(f"wall_s_{name}_min={min(walls[live]):.2f}")
        print(f"wall_s_{name}_max={max(walls[live]):.2f}")
        print(f"trial_epochs_{name}={','.join(map(str, epochs[live]))}")
    on, off = statistics.median(walls[True]), statistics.median(walls[False])
    print(f"overhead_pct={(on - off) / off * 100:.2f}")


if __name__ == "__main__":
    main()
