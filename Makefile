# Two commands: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup train test clean

setup: $(STAMP)

# torch is pinned to the CPU build first: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	@echo "make train needs the training engine (issue 4), which has not landed yet." >&2
	@exit 2

test: $(STAMP)
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
