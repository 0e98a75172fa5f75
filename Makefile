# The two set-up commands: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv and installs the project first if needed. `make test-fast` runs only the
# fast tier of the suite: the tests that start no Ray (tests/conftest.py fails any that does).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Ray's CLI clients need token auth mode to talk to a head started here.
export RAY_AUTH_MODE ?= token
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast ui bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/ablate.py --config configs/ablations/demo.yaml --resume

# The fast tier, then the `ray` tier, as two pytest runs that each print their own time. Exit
# status 5 (no test selected) is not a failure: a tier may be empty in a narrowed run.
FAST := $(BIN)/python -m pytest -q -m "not ray and not slow" tests || test $$? -eq 5
SLOW := $(BIN)/python -m pytest -q -m "slow and not ray" tests || test $$? -eq 5
RAY := $(BIN)/python -m pytest -q -m ray tests || test $$? -eq 5

# tests/test_report.py opens the HTML report in headless Chromium (Debian's `chromium`).
test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	$(FAST)
	$(SLOW)
	$(RAY)

test-fast: $(STAMP)
	$(FAST)

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $${PORT:-5000}

# Each benchmark writes <name>.json and <name>.md into bench/results; summary.md gathers them.
bench: $(STAMP)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/ingest.py
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
