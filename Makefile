# Two commands do all set-up on a fresh machine: `make demo` and `make test` (each creates .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; a GPU machine installs the CUDA build of this version first (docs/operations.md, "GPU machines").
TORCH ?= torch==2.13.0

.PHONY: install browser demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e '.[dev]'
	touch $(STAMP)

# The demo's three steps share one output folder (OUT=... to choose it; rerunning with the same OUT
# resumes the training and the sweep): train the MoE, run a 2-trial sweep, serve the trained
# checkpoint and answer one prompt over HTTP.
DEMO_OUT := $(or $(OUT),runs/demo-$(shell date +%Y%m%d-%H%M%S))

demo: install
	$(PY) -m jobs.train --spec jobs/examples/demo.yaml --out $(DEMO_OUT)
	$(PY) -m jobs.sweep --spec jobs/examples/sweep-demo.yaml --out $(DEMO_OUT)/sweep
	$(PY) -m jobs.serve --spec jobs/examples/serve.yaml --set checkpoint=$(DEMO_OUT)/ray-train --prompt "def fibonacci(n):"

test: install browser
	$(PY) -m pytest

# The dashboard's tests drive Debian's Chromium through Playwright (no browser download). Installed
# here when missing and running as root (CI); otherwise those tests skip and say how to install it.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test-fast: install
	$(PY) -m pytest -m "not ray"

bench: install
	$(PY) -m tests.bench

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
