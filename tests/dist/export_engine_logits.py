"""Run under torchrun: rebuild a gal-train run's DeepSpeed engine as pretrain/train.py does, load its
latest checkpoint, and save (rank 0) the eval-mode logits on INPUTS to RESULT.

    export_engine_logits.py RUN_DIR INPUTS RESULT     (TP size from RUN_DIR/config.yaml)
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from model import parallel
from model.transformer import GalacticaLM
from pretrain import checkpoint, engine as ds_engine
from pretrain.config import TrainConfig
from pretrain.train import model_config, read_manifest


def main(run_dir: str, inputs_path: str, result_path: str) -> None:
    run_dir = Path(run_dir)
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / "config.yaml"))
    typed: TrainConfig = OmegaConf.to_object(cfg)
    parallel.init_distributed(typed.trainer.tensor_parallel)
    parallel.manual_seed(typed.seed)
    model = GalacticaLM(model_config(typed, read_manifest(Path(typed.data.path))))
    engine, _, _ = ds_engine.build(typed, model, micro_batch_size=1, grad_accum=1, tokens_per_step=1,
                                   total_steps=1, device=torch.device("cpu"))
    checkpoint.use_weights_only_loading(engine)
    checkpoint.load(engine, run_dir / "checkpoints")
    engine.module.eval()
    with torch.no_grad():
        logits = engine(torch.load(inputs_path))  # no labels: logits gathered over the TP ranks
    if dist.get_rank() == 0:
        torch.save(logits, result_path)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
