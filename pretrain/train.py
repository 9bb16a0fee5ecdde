"""gal-train: pretrain a Galactica model with DeepSpeed.

    gal-train                                   # tiny model, built-in sample shards, CPU
    gal-train model=125m deepspeed=zero3 data.path=/shards trainer.max_tokens=450e9
    torchrun --nproc-per-node=8 -m pretrain.train model=1.3b trainer.tensor_parallel=2
    srun python -m pretrain.train ...           # rank and world from SLURM (launch/env.py)

This file is the command line only: Hydra composes the config (conf/, pretrain/config.py),
pretrain/trainer/setup.py builds the run, pretrain/trainer/loop.py trains it (the path of a batch
and the exit codes are described there and in docs/architecture.md).
"""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from launch.env import detect
from launch.slurm import requeue_if_preempted
from pretrain.cli import expected_message, hydra_app
from pretrain.config import register, typed
from pretrain.trainer.loop import EXIT_DONE, EXIT_LOSS_GUARD, EXIT_PREEMPTED, fit  # noqa: F401 (the exit codes)
from pretrain.trainer.setup import build_run

register()


def run(cfg: DictConfig) -> int:
    """Train the run ``cfg`` describes; returns the exit code."""
    hydra_run = HydraConfig.initialized()
    run_dir = Path(HydraConfig.get().runtime.output_dir if hydra_run else cfg.run_dir)
    try:
        train_cfg = typed(cfg)
        if hydra_run and not train_cfg.logger.group and HydraConfig.get().mode == RunMode.MULTIRUN:
            train_cfg.logger.group = Path(HydraConfig.get().sweep.dir).name  # a sweep's points group in wandb
        return fit(build_run(train_cfg, run_dir, detect()))
    except Exception as e:
        if expected_message(e) is not None:
            discard_if_empty(run_dir)
        raise


def discard_if_empty(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote into it before the run failed."""
    hydra_only = {".hydra", "train.log"}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= hydra_only:
        shutil.rmtree(run_dir, ignore_errors=True)


def _task(cfg: DictConfig) -> None:
    code = run(cfg)
    if dist.get_rank() == 0:
        requeue_if_preempted(code)
    if code:
        sys.exit(code)


def main() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    hydra_app("gal-train", "config", _task)


if __name__ == "__main__":
    main()
