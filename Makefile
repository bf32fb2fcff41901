# Two entry points for users: `make run` and `make test` (see README).
# `install` is idempotent: it re-runs only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean system-packages

install: $(STAMP)

# Order matters (measured): torch first, pinned, so pip takes the CPU build on disk
# instead of pulling a multi-GB CUDA build; deepspeed next without build isolation so
# its build sees that torch; then the project itself with everything else pinned.
# DS_BUILD_SHM_COMM=1 compiles DeepSpeed's CPU shared-memory collectives into the install:
# otherwise the first DeepSpeed run of every new venv compiles them on the fly (~80 s here),
# inside a training run. --no-cache-dir: a cached deepspeed wheel built without it would be
# reused as it is.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	DS_BUILD_SHM_COMM=1 $(BIN)/pip install --quiet --no-cache-dir --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job on embedded defaults: a search on synthetic MOSI-shaped data, then export.
EXP ?= runs/quick-$(shell date +%Y%m%d-%H%M%S)
run: install
	$(BIN)/msa-search tune --config configs/quick.yaml --set output.dir=$(EXP)
	$(BIN)/msa-search export $(EXP) --out $(EXP)/best.yaml
	$(BIN)/msa-search report $(EXP) --out $(EXP)/report.html
	@echo "Results: $(EXP)/ (results/ = per-pattern Parquet rows, optuna.db = Optuna study, best.yaml = best config)"
	@echo "Report: $(EXP)/report.html (open it in a browser; it needs no network)"
	@echo "Retrain the best: $(BIN)/msa-search train --config $(EXP)/best.yaml"

# Two pytest-xdist workers, each running whole modules (a module's Ray cluster and fixtures stay
# in one process), the modules with most tests first (xdist's default; handing out the slowest
# first measured slower, 834 s against 780 s: the two heaviest Ray modules then overlap). Much
# of a test's time is in other processes (Ray's daemons, trials, the CLI's subprocesses), whose
# CPU time(1) partly misses: it counted ~610 s for a one-process suite of 1,150 s. On 2 cores,
# 2026-11-29: 13-14.5 min with two workers against 19 min in one process. Three workers are
# slower (an AMD box, 2026-11-29: 1,203 s against 1,137 s with two): counting every process's
# CPU each second, two workers keep both cores ~98% busy. TEST_WORKERS=0: one process. Each
# worker's torch ops run on its share of the cores (tests/conftest.py): 1,080 s -> 953 s on the
# AMD box, 2026-11-30.
TEST_WORKERS ?= 2
test: install system-packages
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=12 tests  # the slowest tests, to keep the suite under 15 min on 2 cores

# Real services the tests run against: Prometheus (its server and promtool) for the live
# metrics, Chromium (driven by playwright, which cannot download its own browser here) for
# the report. Entries are package:binary. Installed with apt-get where we are root (CI, fresh
# machines); otherwise the line below says what to install, and the tests that need it are
# skipped with that reason.
SYSTEM_PACKAGES := prometheus:promtool chromium:chromium
system-packages:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
	  command -v $${entry#*:} >/dev/null 2>&1 || missing="$$missing $${entry%%:*}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
	  echo "note: tests that need$$missing will be skipped; install with: sudo apt-get install$$missing"; \
	fi

bench: install
	$(BIN)/python bench/data_load.py
	$(BIN)/python bench/step_throughput.py --model lnln --shape mosi-aligned

clean:
	rm -rf $(VENV) runs .pytest_cache
