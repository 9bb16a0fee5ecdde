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

import shutil
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launch.env import detect
from launch.slurm import EXIT_PREEMPTED, requeue_if_preempted  # noqa: F401 (EXIT_*: the exit codes)
from launch.sweep import name_point
from pretrain.cli import EXIT_DONE, EXIT_LOSS_GUARD, expected_message, hydra_app, quiet_third_party  # noqa: F401
from pretrain.config import register, typed

# torch, DeepSpeed and megatron-core are imported when a run starts (run()): `gal-train --help` and a
# config error answer at once, and their start-up noise goes to train.log (pretrain.cli.quiet_third_party).
register()


def run(cfg: DictConfig) -> int:
    """Train the run ``cfg`` describes; returns the exit code."""
    quiet_third_party()
    from pretrain.trainer.loop import fit
    from pretrain.trainer.setup import build_run

    hydra_run = HydraConfig.initialized()
    run_dir = Path(HydraConfig.get().runtime.output_dir if hydra_run else cfg.run_dir)
    try:
        train_cfg = typed(cfg)
        if hydra_run:
            name_point(train_cfg.logger, HydraConfig.get())  # a sweep point's wandb group and name
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
    import torch.distributed as dist

    code = run(cfg)
    if dist.get_rank() == 0:
        requeue_if_preempted(code)
    if code:
        sys.exit(code)


def main() -> None:
    hydra_app("gal-train", "config", _task)


if __name__ == "__main__":
    main()
