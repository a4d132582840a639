# Two commands: `make demo` (set up, fetch the offline assets, run the main job) and `make test`.
# GPU users: make TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

DEVICE ?= cuda
BENCH_DATA := data/benchmarks/facts/test-500.jsonl

.PHONY: demo test install assets lint benchmarks gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so that resolving the project never pulls a CUDA build by accident
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

assets: install
	$(BIN)/python data/fetch_assets.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: assets lint
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider

demo: assets
	$(BIN)/genadapter demo

# the episode files the benchmarks and evaluations read (git-ignored, deterministic from a seed)
$(BENCH_DATA): | assets
	$(BIN)/python -m genadapter.cli make-benchmarks

# the performance suite (experiments/bench/): full by default, QUICK=1 for ~2 minutes a script
benchmarks: assets $(BENCH_DATA)
	$(BIN)/python experiments/bench/run_all.py $(if $(QUICK),--quick)

# one GPU, offline, <= 8 minutes: device tests, a bf16-mixed training run, benchmarks, one report
# (experiments/gpu/README.md). DEVICE=cpu QUICK=1: the same script as a <= 3-minute dry run (CI)
gpu-check: assets
	$(BIN)/python experiments/gpu/check.py --device $(DEVICE) $(if $(QUICK),--quick)
