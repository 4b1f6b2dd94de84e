# The README's two commands: `make demo` (set up + run the demo) and `make test`;
# `make check` before a push, `make docs` for the site.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo test test-fast check lint format docs
$(VENV)/.installed: pyproject.toml scripts/constraints-cpu.txt scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/dsft demo $(ARGS)

# Two pytest workers per machine (at most 4): most tests are one tiny-model process whose
# import and start-up hold one core, so a second worker halves the wall time on CI's 2 cores.
# Tests sharing an expensive module fixture or a Slurm cluster stay on one worker
# (xdist_group, tests/conftest.py). `make test ARGS="-n 0"` runs them in one process.
test: setup
	$(PY) -m pytest -n auto --maxprocesses 4 --dist loadgroup $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "unit and not slow" $(ARGS)

# Before a push: lint, format check and the fast unit tests (the make test-fast set).
check: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "unit and not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# The docs site into site/ (git-ignored). The configuration reference is generated from the
# config dataclasses while it builds (scripts/mkdocs_hooks.py). The dev extra carries MkDocs;
# an older .venv gets the docs extra here.
docs: setup
	$(PY) -c "import mkdocs, material" 2>/dev/null || $(VENV)/bin/pip install --quiet -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict
