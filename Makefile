# Two commands: `make train` and `make test` (`make test-fast`: the unit tier only, no trainer, torchrun or
# Slurm; under 3 min on 2 cores). All create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup train test test-fast drill clean

setup: $(STAMP)

# torch is pinned to the CPU build first: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: prepare the built-in sample corpus once (512-token sequences, 8k vocabulary), then
# train the 2-layer model for 2 epochs on the CPU: a few minutes on 2 cores.
SAMPLE_SHARDS  ?= data/sample_shards
TRAIN_RUN_DIR  ?= runs/make-train-$(shell date +%Y%m%d-%H%M%S)
TRAIN_ARGS     ?= model=tiny-2l trainer.max_epochs=2

train: $(STAMP)
	grep -qs galactica-shards-v2 $(SAMPLE_SHARDS)/manifest.json || $(VENV)/bin/gal-prepare shards.seq_len=512 output=$(SAMPLE_SHARDS) overwrite=true
	$(VENV)/bin/gal-train data.path=$(SAMPLE_SHARDS) run_dir=$(TRAIN_RUN_DIR) $(TRAIN_ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -q

# markers: pyproject.toml [tool.pytest.ini_options]
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow and not multirank and not slurm and not trainer"

# The random-kill drill (docs/reliability.md): 10 SIGKILLs a layout over ZeRO-1/2/3 and TP2xDP2, each resume
# bit-identical to the uninterrupted run; about 20 minutes on 2 cores. The kills go to DRILL_REPORT.
DRILL_REPORT ?= runs/kill_drill.jsonl
drill: $(STAMP)
	mkdir -p $(dir $(DRILL_REPORT))
	$(VENV)/bin/pytest -q -s tests/faults/test_kill_drill.py --kill-drill=10 --kill-drill-report=$(DRILL_REPORT)

clean:
	rm -rf $(VENV) .pytest_cache
