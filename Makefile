# Set-up and entry points. `make demo` and `make test` each install everything they need
# into ./.venv first (idempotent: reinstalls only when requirements or sources change).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dymu-installed

.PHONY: install demo test bench compile-check clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -m pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

demo: install
	$(BIN)/dymu demo

test: install
	$(BIN)/python -m pytest -q tests benchmarks

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-enable -q

compile-check: install
	env -u TRITON_INTERPRET $(BIN)/python -m dymu_kernels.compile_check

clean:
	rm -rf build *.egg-info dymu_kernels/_C*.so
