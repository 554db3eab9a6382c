# The two commands a newcomer needs: `make demo` (install + the main job end to end) and
# `make test` (lint, then the whole suite, as CI runs it); `make test-fast` skips the tests marked slow.
# Every target installs first through the project's own step, `make setup` (scripts/setup.sh:
# .venv/ with torch, fbgemm-gpu(-cpu), torchrec, this project); it is a no-op when nothing
# changed. DEVICE=cuda installs the GPU builds.

VENV   := .venv
PY     := $(VENV)/bin/python
LONGER := $(VENV)/bin/longer
DEVICE ?= cpu
DEMO   ?= demo
PYTEST_ARGS ?=

.PHONY: setup lint demo test test-fast bench-data bench-train bench-quality bench-quality-quick clean

setup:
	@DEVICE=$(DEVICE) bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh $(DEMO)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench-data: setup
	$(LONGER) bench data --out bench-out/data.json

bench-train: setup
	$(LONGER) bench train --out bench-out/train.json

bench-quality: setup
	@bash scripts/quality.sh bench-out/quality

bench-quality-quick: setup
	@bash scripts/quality.sh bench-out/quality --quick

clean:
	rm -rf $(DEMO) bench-out .pytest_cache
