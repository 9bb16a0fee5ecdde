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
import sys
from pathlib import Path

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launch.env import detect
from launch.slurm import requeue_if_preempted
from pretrain.config import CONF_DIR, ConfigError, TrainConfig, register
from pretrain.trainer.loop import EXIT_DONE, EXIT_LOSS_GUARD, EXIT_PREEMPTED, fit  # noqa: F401 (the exit codes)
from pretrain.trainer.setup import build_run

register()


def run(cfg: DictConfig) -> int:
    """Train the run ``cfg`` describes; returns the exit code."""
    typed: TrainConfig = OmegaConf.to_object(cfg)
    hydra_run = HydraConfig.initialized()
    if hydra_run and not typed.logger.group and HydraConfig.get().mode == RunMode.MULTIRUN:
        typed.logger.group = Path(HydraConfig.get().sweep.dir).name  # a sweep's points group in wandb
    run_dir = Path(HydraConfig.get().runtime.output_dir if hydra_run else typed.run_dir)
    return fit(build_run(typed, run_dir, detect()))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        code = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if dist.get_rank() == 0:
        requeue_if_preempted(code)
    if code:
        sys.exit(code)


def main() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _hydra_main()


if __name__ == "__main__":
    main()
