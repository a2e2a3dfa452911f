# Two commands do all set-up on a fresh machine: `make demo` and `make test` (each creates .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; a GPU machine installs the CUDA build of this version first (README).
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m jobs.train --spec jobs/examples/demo.yaml $(if $(OUT),--out $(OUT))

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not ray"

bench: install
	$(PY) -m tests.bench

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
