# The two commands a user needs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE := disabled
# Test files run on this many pytest-xdist workers, a whole file on one worker (its module
# fixtures, such as a local Ray, once). Serial, the suite leaves a core idle 40% of the time.
TEST_WORKERS ?= 2

.PHONY: demo test lint format bench clean

$(BIN)/dgan: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision first, exactly these releases: they come from the local wheel cache.
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(BIN)/dgan

demo: $(BIN)/dgan
	$(BIN)/dgan demo

test: $(BIN)/dgan
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(BIN)/dgan
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/dgan
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(BIN)/dgan
	$(BIN)/python benchmarks/bench_demo_data.py
	$(BIN)/python benchmarks/bench_train_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
