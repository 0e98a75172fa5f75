# The two set-up commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs the project first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Ray's CLI clients need token auth mode to talk to a head started here.
export RAY_AUTH_MODE ?= token
export PYTHONUNBUFFERED := 1

.PHONY: demo test ui bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/ablate.py --config configs/ablations/demo.yaml --resume

# tests/test_report.py opens the HTML report in headless Chromium (Debian's `chromium`).
test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	$(BIN)/python -m pytest -q tests

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $${PORT:-5000}

# Each benchmark writes <name>.json and <name>.md into bench/results; summary.md gathers them.
bench: $(STAMP)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/dynmm_cost.py
	$(BIN)/python bench/m2pt_merge.py
	$(BIN)/python bench/reprogram_cost.py
	$(BIN)/python bench/gpu_throughput.py
	$(BIN)/python bench/summary.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs reports mlflow.db mlartifacts data/shards
