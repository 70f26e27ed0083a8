# Every target sets itself up on a fresh machine: it creates .venv and installs keyledger.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv lint typecheck test test-compat demo bench bench-instructions clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q

# The newer Pythons keyledger supports, each in a .venv-X.Y of its own (skipped when the
# interpreter is not installed). CI runs the quick form: the unit tests on 3.12, and on
# 3.13 everything but the PostgreSQL and slow (multi-process) tests. FULL=1 runs the
# whole suite on both.
test-compat:
ifeq ($(FULL),1)
	scripts/test-compat.sh python3.12
	scripts/test-compat.sh python3.13
else
	scripts/test-compat.sh python3.12 tests/unit
	scripts/test-compat.sh python3.13 -m "not postgres and not slow"
endif

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

bench: $(STAMP)
	$(BIN)/python bench/run.py --out docs/benchmarks.md
	$(BIN)/python bench/lifecycle.py --out docs/benchmarks-lifecycle.md
	$(BIN)/python bench/audit.py --out docs/benchmarks-audit.md

# Instructions per store and retrieve, keyledger and the peer (callgrind; needs valgrind).
bench-instructions: $(STAMP)
	$(BIN)/python bench/instructions.py --out docs/benchmarks-instructions.md

clean:
	rm -rf $(VENV) .venv-3.* .mypy_cache .pytest_cache .ruff_cache
