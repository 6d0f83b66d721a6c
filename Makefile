# Everything a fresh machine needs: `make run` (install + the main job) and `make test`.
PYTHON      ?= python3
VENV        ?= .venv
# The CPU torch wheel. With a GPU: `make run CONSTRAINTS=` (any torch) or your own pin file.
CONSTRAINTS ?= constraints.txt
PROFILE     ?=
BIN         := $(abspath $(VENV))/bin
PIP_FLAGS   := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export PATH := $(BIN):$(PATH)

.PHONY: install install-dev run test bench ui status clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The main job: every stage of dvc.yaml on built-in data, then where to look.
run: install
	$(if $(PROFILE),kiln profile $(PROFILE),)
	kiln run
	@echo
	@kiln summary
	@echo
	@echo "All metrics: dvc metrics show; stage by stage: kiln status"
	@echo "Runs, metrics and artifacts: make ui  (the MLflow UI on http://127.0.0.1:5000)"

test: install-dev
	$(BIN)/python -m pytest -q

bench: install-dev
	$(BIN)/python benchmarks/bench_ngram.py --out benchmarks/results/ngram.json
	$(BIN)/python benchmarks/bench_orchestration.py --out benchmarks/results/orchestration.json
	$(BIN)/python benchmarks/bench_scan.py --out benchmarks/results/scan.json
	$(BIN)/python benchmarks/bench_lm.py --out benchmarks/results/lm.json
	$(BIN)/python benchmarks/bench_coco_eval.py --out benchmarks/results/coco_eval.json
	$(BIN)/python benchmarks/bench_detection.py --out benchmarks/results/detection.json
	$(BIN)/python benchmarks/bench_images.py --out benchmarks/results/images.json

ui: install
	kiln ui

status: install
	kiln status

clean:
	rm -rf data mlruns mlflow.db .pytest_cache
