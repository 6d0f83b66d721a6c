# Everything a fresh machine needs: `make run` (install + the main job) and `make test`.
PYTHON      ?= python3
VENV        ?= .venv
# The CPU torch wheel. With a GPU: `make run CONSTRAINTS=` (any torch) or your own pin file.
CONSTRAINTS ?= constraints.txt
# The lock (`make lock` writes it): every package of .[dev] at one version, with the hashes of its files, so
# every install of this kind of machine gets the same bytes. It pins the CPU torch of constraints.txt, so it
# applies only with that file: `CONSTRAINTS=` or another pin file (a CUDA torch) installs without it, as does
# `LOCK=`.
LOCK        ?= $(if $(filter constraints.txt,$(CONSTRAINTS)),requirements.lock,)
# `make lock`: uv resolves (pinned here so a relock is the same program); the CPU torch wheel of
# constraints.txt comes from this machine kind's wheelhouse; UPGRADE=1 moves every pin to the newest release
# (otherwise the pins of the existing lock are kept and only what pyproject.toml or constraints.txt changed moves).
UV_VERSION  ?= 0.13.9
WHEELHOUSE  ?= /opt/wheels
UPGRADE     ?=
PROFILE     ?=
# Background servers on loopback (pid, log and data files under $(SERVICES)); see README, Operations.
SERVICES     ?= .services
PREFECT_PORT ?= 4200
MLFLOW_PORT  ?= 5001
PG_PORT      ?= 5433
SUDO         := $(if $(filter 0,$(shell id -u)),,sudo)
BIN         := $(abspath $(VENV))/bin
PIP_FLAGS   := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export PATH := $(BIN):$(PATH)
# tests/test_lock.py compares the installed versions with the lock unless this is empty (installed without it).
export KILN_LOCK := $(LOCK)

.PHONY: install install-dev lock run test lint bench bench-stages ui status clean services postgresql chromium prefect-server mlflow-server services-stop

ifneq ($(LOCK),)
# The lock holds .[dev] whole (one lock, one set of versions), so both stamps come from one install. uv
# installs it (90 s on 2 cores against pip's 126 s, with the same hashes checked): pip first installs the
# lock's own uv entry, hashes and all, then uv the rest. --compile-bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set (this machine kind), a venv without .pyc files recompiles every module in
# every process, and `import mlflow, prefect, torch, dvc.repo` takes 10.4 s instead of 4.7 s. Kiln itself goes
# in without dependencies (they are all in the lock) and without build isolation: the lock's setuptools
# builds it, so nothing unhashed is downloaded.
$(VENV)/.installed $(VENV)/.installed-dev &: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	awk '/^uv==/ {on = 1; print; next} on && /^ / {print; next} {on = 0}' $(LOCK) > $(VENV)/uv-requirement.txt
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(VENV)/uv-requirement.txt
	$(BIN)/uv pip install --python $(BIN)/python --quiet --require-hashes --compile-bytecode -r $(LOCK) \
	  $(addprefix --find-links ,$(wildcard $(WHEELHOUSE)))
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(VENV)/.installed $(VENV)/.installed-dev
else
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) -e .
	touch $@

# One resolution for both sets (a second `pip install -e '.[dev]'` after the first re-resolves and rebuilds).
$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) -e '.[dev]'
	touch $(VENV)/.installed $@
endif

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Rewrites requirements.lock from pyproject.toml (.[dev]) and constraints.txt, for Python 3.11 on x86_64 Linux,
# with the hashes of every file the index offers for each pinned version (and the wheelhouse's torch). Commit
# it with the change that needed it; the next `make install` reinstalls from it.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'uv==$(UV_VERSION)'
	$(BIN)/uv pip compile pyproject.toml --extra dev -c constraints.txt --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 $(addprefix --find-links ,$(WHEELHOUSE)) \
	  $(if $(UPGRADE),--upgrade,) --custom-compile-command 'make lock' --quiet -o requirements.lock

# The main job: every stage of dvc.yaml on built-in data, then where to look.
run: install
	$(if $(PROFILE),kiln profile $(PROFILE),)
	kiln run
	@echo
	@kiln summary
	@echo
	@echo "All metrics: dvc metrics show; stage by stage: kiln status"
	@echo "Runs, metrics and artifacts: make ui  (the MLflow UI on http://127.0.0.1:5000)"

# Two pytest workers, each taking whole test files (module fixtures stay in one worker), the longest files
# first (tests/conftest.py: LONGEST_FIRST; --no-loadscope-reorder keeps that order, which xdist would
# otherwise replace by the number of tests per file); one torch thread per process, as two workers on 2 cores
# would otherwise spin each other's OpenMP threads. A third worker was measured: 12.6 min of pytest, no faster.
TEST_WORKERS ?= 2
test: install-dev services lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	  --durations=15

# Format, lint, the import contract (pyproject.toml [tool.importlinter]) and dvc.yaml against the stage specs.
lint: install-dev
	$(BIN)/ruff format --check flows tasks models tests benchmarks
	$(BIN)/ruff check flows tasks models tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/kiln check

bench: install-dev
	$(BIN)/python benchmarks/bench_ngram.py --out benchmarks/results/ngram.json
	$(BIN)/python benchmarks/bench_orchestration.py --out benchmarks/results/orchestration.json
	$(BIN)/python benchmarks/bench_forkserver.py --out benchmarks/results/forkserver.json
	$(BIN)/python benchmarks/bench_repro.py --out benchmarks/results/repro.json
	$(BIN)/python benchmarks/bench_scan.py --out benchmarks/results/scan.json
	$(BIN)/python benchmarks/bench_lm.py --out benchmarks/results/lm.json
	$(BIN)/python benchmarks/bench_threads.py --out benchmarks/results/threads.json
	$(BIN)/python benchmarks/bench_coco_eval.py --out benchmarks/results/coco_eval.json
	$(BIN)/python benchmarks/bench_detection.py --out benchmarks/results/detection.json
	$(BIN)/python benchmarks/bench_images.py --out benchmarks/results/images.json
	$(BIN)/python benchmarks/bench_nflow.py --out benchmarks/results/nflow.json

# The stage profile: every stage of the params' profile once (about an hour on the default profile, on idle
# cores), then each stage's seconds split by the phases it logs (benchmarks/results/stages.json), and the
# benchmarks that need the built default pipeline (the mAP bootstrap, DVC's steps on its dvc.lock).
# A fixed LM benchmark before and after the run says how fast the machine ran that day (bench_stages.py).
bench-stages: install-dev
	$(BIN)/python benchmarks/bench_lm.py --steps 30 --warmup 5 --out benchmarks/results/calibration_before.json
	$(BIN)/kiln run --force
	$(BIN)/python benchmarks/bench_lm.py --steps 30 --warmup 5 --out benchmarks/results/calibration_after.json
	$(BIN)/python benchmarks/bench_map_bootstrap.py --out benchmarks/results/map_bootstrap.json
	$(BIN)/python benchmarks/bench_dvc_ops.py --out benchmarks/results/dvc_ops.json
	$(BIN)/python benchmarks/bench_stages.py --out benchmarks/results/stages.json \
	  --calibration benchmarks/results/calibration_before.json --calibration benchmarks/results/calibration_after.json

# Debian packages the operations tests drive, apt-installed only when missing (tests/ops/ fail without
# them). KILN_SKIP_SERVICE_TESTS=1 skips both the installs and those tests.
services: postgresql chromium

postgresql:
ifneq ($(KILN_SKIP_SERVICE_TESTS),1)
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends postgresql; }
endif

chromium:
ifneq ($(KILN_SKIP_SERVICE_TESTS),1)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium chromium-driver; }
endif

# A Prefect server for schedules (`kiln serve --cron`, prefect.yaml): its database under $(SERVICES)/prefect.
prefect-server: install
	$(BIN)/python -m flows.services prefect --dir $(SERVICES) --port $(PREFECT_PORT)

# PostgreSQL (cluster in $(SERVICES)/pg, database mlflow) and an MLflow server on it, artifacts served
# from $(SERVICES)/mlflow-artifacts.
mlflow-server: install postgresql
	$(BIN)/python -m flows.services mlflow --dir $(SERVICES) --port $(MLFLOW_PORT) --pg-port $(PG_PORT)

services-stop:
	$(BIN)/python -m flows.services stop --dir $(SERVICES)

ui: install
	kiln ui

status: install
	kiln status

clean:
	rm -rf data mlruns mlflow.db .pytest_cache
