#!/bin/bash
# Galactica 1.3B (24 layers, d_model 2048; paper Table 5) on 4 node(s) of 8 GPUs = 32 GPUs:
# tensor parallel 1 (inside a node) x data parallel 32, ZeRO-1, micro batch 1 sequence(s),
# global batch 480 sequences x 2048 = 983,040 tokens (gradient accumulation 15).
# The layout is what `gal-plan --model 1.3b --nodes 4 --suggest` chose for 80 GiB GPUs
# (12.60 GiB per GPU); re-run it for other GPUs or node counts and paste its overrides here.
#
#   bash slurm/examples/1.3b.sh data.path=/data/shards trainer.max_tokens=450e9
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=lab bash slurm/examples/1.3b.sh ...   # more sbatch options
#
# Arguments are Hydra overrides (after these, so they win); sbatch reads SBATCH_* variables.
set -euo pipefail
exec sbatch --nodes=4 --job-name=gal-1.3b "$(dirname "$0")/../pretrain.sbatch" \
    model=1.3b validation=science trainer.tensor_parallel=1 trainer.micro_batch_size=1 deepspeed=zero1 trainer.global_batch_tokens=983040 "$@"
