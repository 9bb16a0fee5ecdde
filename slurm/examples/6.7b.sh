#!/bin/bash
# Galactica 6.7B (32 layers, d_model 4096; paper Table 5) on 16 node(s) of 8 GPUs = 128 GPUs:
# tensor parallel 2 (inside a node) x data parallel 64, ZeRO-1, micro batch 1 sequence(s),
# global batch 960 sequences x 2048 = 1,966,080 tokens (gradient accumulation 15).
# The layout is what `gal-plan --model 6.7b --nodes 16 --suggest` chose for 80 GiB GPUs
# (22.13 GiB per GPU); re-run it for other GPUs or node counts and paste its overrides here.
#
#   bash slurm/examples/6.7b.sh data.path=/data/shards trainer.max_tokens=450e9
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=lab bash slurm/examples/6.7b.sh ...   # more sbatch options
#
# Arguments are Hydra overrides (after these, so they win); sbatch reads SBATCH_* variables.
set -euo pipefail
exec sbatch --nodes=16 --job-name=gal-6.7b "$(dirname "$0")/../pretrain.sbatch" \
    model=6.7b validation=science trainer.tensor_parallel=2 trainer.micro_batch_size=1 deepspeed=zero1 trainer.global_batch_tokens=1966080 "$@"
