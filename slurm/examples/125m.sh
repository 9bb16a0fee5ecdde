#!/bin/bash
# Galactica 125M (12 layers, d_model 768; paper Table 5) on 1 node(s) of 8 GPUs = 8 GPUs:
# tensor parallel 1 (inside a node) x data parallel 8, ZeRO-1, micro batch 2 sequence(s),
# global batch 240 sequences x 2048 = 491,520 tokens (gradient accumulation 15).
# The layout is what `gal-plan --model 125m --nodes 1 --suggest` chose for 80 GiB GPUs
# (6.74 GiB per GPU); re-run it for other GPUs or node counts and paste its overrides here.
#
#   bash slurm/examples/125m.sh data.path=/data/shards trainer.max_tokens=450e9
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=lab bash slurm/examples/125m.sh ...   # more sbatch options
#
# Arguments are Hydra overrides (after these, so they win); sbatch reads SBATCH_* variables.
set -euo pipefail
exec sbatch --nodes=1 --job-name=gal-125m "$(dirname "$0")/../pretrain.sbatch" \
    model=125m validation=science trainer.tensor_parallel=1 trainer.micro_batch_size=2 deepspeed=zero1 trainer.global_batch_tokens=491520 "$@"
