#!/bin/bash
# Galactica 30B (48 layers, d_model 7168; paper Table 5) on 32 node(s) of 8 GPUs = 256 GPUs:
# tensor parallel 4 (inside a node) x data parallel 64, ZeRO-1, micro batch 1 sequence(s),
# global batch 960 sequences x 2048 = 1,966,080 tokens (gradient accumulation 15).
# The layout is what `gal-plan --model 30b --nodes 32 --suggest` chose for 80 GiB GPUs
# (43.43 GiB per GPU); re-run it for other GPUs or node counts and paste its overrides here.
#
#   bash slurm/examples/30b.sh data.path=/data/shards trainer.max_tokens=450e9
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=lab bash slurm/examples/30b.sh ...   # more sbatch options
#
# Arguments are Hydra overrides (after these, so they win); sbatch reads SBATCH_* variables.
set -euo pipefail
exec sbatch --nodes=32 --job-name=gal-30b "$(dirname "$0")/../pretrain.sbatch" \
    model=30b validation=science trainer.tensor_parallel=4 trainer.micro_batch_size=1 deepspeed=zero1 trainer.global_batch_tokens=1966080 "$@"
