#!/bin/bash
# Galactica 120B (96 layers, d_model 10240; paper Table 5) on 128 node(s) of 8 GPUs = 1024 GPUs:
# tensor parallel 8 (inside a node) x data parallel 128, ZeRO-1, micro batch 2 sequence(s), activation checkpointing,
# global batch 1024 sequences x 2048 = 2,097,152 tokens (gradient accumulation 4).
# The layout is what `gal-plan --model 120b --nodes 128 --suggest` chose for 80 GiB GPUs
# (69.68 GiB per GPU); re-run it for other GPUs or node counts and paste its overrides here.
#
#   bash slurm/examples/120b.sh data.path=/data/shards trainer.max_tokens=450e9
#   SBATCH_PARTITION=gpu SBATCH_ACCOUNT=lab bash slurm/examples/120b.sh ...   # more sbatch options
#
# Arguments are Hydra overrides (after these, so they win); sbatch reads SBATCH_* variables.
set -euo pipefail
exec sbatch --nodes=128 --job-name=gal-120b "$(dirname "$0")/../pretrain.sbatch" \
    model=120b validation=science trainer.tensor_parallel=8 trainer.micro_batch_size=2 deepspeed=zero1 model.activation_checkpointing=true trainer.global_batch_tokens=2097152 "$@"
