# Two set-up commands (README): `make demo` runs the pipeline on the built-in synthetic world,
# `make test` runs the whole test suite.  Each creates .venv on first use.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: venv demo test lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py --output $(RUN)

# two pytest workers with one torch thread each: 7m38s instead of 11m48s on 2 cores (a tiny ViT's step does not
# spread over two threads, and two 2-thread processes lose at OpenMP barriers)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
