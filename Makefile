# Two commands: `make train` and `make test` (`make test-fast`: the unit tier only, no trainer, torchrun or
# Slurm; under 3 min on 2 cores). All create .venv on first use.
# Python 3.11 or newer (checked before the venv is made)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup train test test-fast drill clean

setup: $(STAMP)

# torch first, as a CPU build: PyPI's Linux torch is the CUDA one, several GB of NVIDIA wheels. Where only
# PyPI is seen, take the CPU wheel from PyTorch's index: make TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (on the project's CI machines a local wheel makes torch==2.13.0 the CPU build).
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else f"$(PYTHON) is Python {sys.version.split()[0]}: galactica-pretrain needs 3.11 or newer (make PYTHON=python3.12 ...)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,eval]"
	touch $(STAMP)

# The main job: prepare the built-in sample corpus once (512-token sequences, 8k vocabulary), then
# train the 2-layer model for 2 epochs on the CPU (a few minutes on 2 cores), and draw it (RUN_DIR/report/).
SAMPLE_SHARDS  ?= data/sample_shards
TRAIN_RUN_DIR  ?= runs/make-train-$(shell date +%Y%m%d-%H%M%S)
TRAIN_ARGS     ?= model=tiny-2l trainer.max_epochs=2

train: $(STAMP)
	grep -qs galactica-shards-v2 $(SAMPLE_SHARDS)/manifest.json || $(VENV)/bin/gal-prepare shards.seq_len=512 output=$(SAMPLE_SHARDS) overwrite=true
	$(VENV)/bin/gal-train data.path=$(SAMPLE_SHARDS) run_dir=$(TRAIN_RUN_DIR) $(TRAIN_ARGS)
	$(VENV)/bin/gal-report $(TRAIN_RUN_DIR)

test: $(STAMP)
	$(VENV)/bin/pytest -q --durations=15

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
