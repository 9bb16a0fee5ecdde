"""Run under torchrun: build a gal-train run's DeepSpeed engine with the trainer's own setup
(pretrain/trainer/setup.py), load its latest checkpoint, and save (rank 0) the eval-mode logits on
INPUTS to RESULT.

    export_engine_logits.py RUN_DIR INPUTS RESULT     (TP size from RUN_DIR/config.yaml)
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from launch.env import detect
from pretrain.config import TrainConfig, typed
from pretrain.trainer import checkpoint, setup


def main(run_dir: str, inputs_path: str, result_path: str) -> None:
    run_dir = Path(run_dir)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / "config.yaml"))
    train_cfg: TrainConfig = typed(cfg)
    env = detect()
    _, model_cfg, shapes = setup.check(train_cfg, env)
    device = setup.init_distributed(train_cfg, env)
    engine, _ = setup.build_engine(train_cfg, model_cfg, shapes, device)
    checkpoint.load(engine, run_dir / "checkpoints")
    engine.module.eval()
    with torch.no_grad():
        logits = engine(torch.load(inputs_path).to(device))  # no labels: logits gathered over the TP ranks
    if dist.get_rank() == 0:
        torch.save(logits.cpu(), result_path)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
