#!/usr/bin/env bash
# What only a GPU can show, in one go on one H100/H200 (at most ~8 minutes), into one JSON:
# bf16 engine steps of 125m and 1.3b with MFU and memory against gal-plan, the NaN guard in bf16, a
# kill/resume bit-exactness check, gal-export's logits against the engine's (bench/gpu_check.py).
#
#   bench/gpu_check.sh [--out bench/results/gpu_check.json]
#   bench/gpu_check.sh --dry-run      the same code on the CPU at tiny sizes (no GPU needed)
#
# Without a GPU (and without --dry-run) it exits with 2, having measured nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "bench/gpu_check.sh: $PY not found: run 'make setup' first (or set PY to the environment's python)" >&2
    exit 2
fi
exec "$PY" bench/gpu_check.py "$@"
