# Two entry points for users: `make run` and `make test` (see README).
# `install` is idempotent: it re-runs only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

install: $(STAMP)

# Order matters (measured): torch first, pinned, so pip takes the CPU build on disk
# instead of pulling a multi-GB CUDA build; deepspeed next without build isolation so
# its build sees that torch; then the project itself with everything else pinned.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: install
	$(BIN)/msa-search data synth --preset mosi --out runs/pipeline-demo/mosi.pkl --format mmsa-pkl --seed 1111 --force
	$(BIN)/msa-search data convert runs/pipeline-demo/mosi.pkl --out runs/pipeline-demo/mosi-parquet --force
	$(BIN)/msa-search data inspect runs/pipeline-demo/mosi-parquet
	@echo "Results: runs/pipeline-demo/ (mosi.pkl = MMSA pickle, mosi-parquet/ = Parquet dataset)"

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python bench/data_load.py

clean:
	rm -rf $(VENV) runs .pytest_cache
