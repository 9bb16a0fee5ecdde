"""Run under torchrun (2 CPU ranks): the production step (pretrain/trainer/step.py) on an engine built by
the trainer's own setup, with every torch.distributed collective wrapped to record the ones that project
code (pretrain/, model/, launch/) issues, and what the loss reduce carried.

    step_allreduces.py SHARDS OUT_DIR        → OUT_DIR/rank<R>.json

4 steps of 4 sequences of 32 tokens (2 micro-batches per rank); rank 1 alone is "signalled" before step 2;
step 4's loss is a NaN drill (trainer.inject_nan_at_steps=[4]).
"""
import json
import os
import sys
from pathlib import Path

import deepspeed.comm
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
PROJECT = tuple(f"{REPO / p}{os.sep}" for p in ("pretrain", "model", "launch"))
# the communication APIs a caller may go through (torch.distributed, deepspeed.comm); not the rest of DeepSpeed:
# the engine's own gradient reduction under engine.backward/step is DeepSpeed's traffic, not a call of ours
COMM_APIS = tuple(f"{Path(m.__file__).parent}{os.sep}" for m in (dist, deepspeed.comm))
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "barrier", "gather", "gather_object", "scatter", "send", "recv",
               "isend", "irecv")

project_calls: list[str] = []  # "name path:line" of collectives our code calls (directly or through deepspeed.comm)
library_calls: list[str] = []  # names of the others (DeepSpeed's gradient reduction, ...)
sent: list[list[float]] = []  # what this rank handed to each all_reduce from project code


def _caller():
    f = sys._getframe(2)  # 0: here, 1: the wrapper, 2: whoever called torch.distributed.<name>
    # up through the communication APIs only, to the code that asked for the collective
    while f is not None and f.f_code.co_filename.startswith(COMM_APIS):
        f = f.f_back
    return f


def _wrap(name: str) -> None:
    orig = getattr(dist, name)

    def wrapper(*args, **kwargs):
        f = _caller()
        if f is not None and f.f_code.co_filename.startswith(PROJECT):
            project_calls.append(f"{name} {Path(f.f_code.co_filename).relative_to(REPO)}:{f.f_lineno}")
            if name == "all_reduce":
                sent.append((args[0] if args else kwargs["tensor"]).tolist())
        else:
            library_calls.append(name)
        return orig(*args, **kwargs)

    setattr(dist, name, wrapper)


def main(shards: str, out_dir: str) -> None:
    from hydra import compose, initialize_config_dir
    from launch.env import detect
    from model import parallel
    from pretrain.config import CONF_DIR, register, typed
    from pretrain.data.loader import EpochLoader
    from pretrain.trainer import setup
    from pretrain.trainer.faults import Drills
    from pretrain.trainer.guards import LossGuard, Preemption, TrainState
    from pretrain.trainer.step import train_step

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = typed(compose("config", overrides=[
            f"data.path={shards}", f"run_dir={out_dir}", "model=tiny-2l", "trainer.global_batch_tokens=128",
            "trainer.max_tokens=512", "optim.warmup_tokens=256", "logger.wandb=false", "data.prefetch=0",
            "trainer.inject_nan_at_steps=[4]"]))
    env = detect()
    data, model_cfg, shapes = setup.check(cfg, env)
    device = setup.init_distributed(cfg, env)
    engine, info = setup.build_engine(cfg, model_cfg, shapes, device)
    loader = EpochLoader(data.train, micro_batch_size=cfg.trainer.micro_batch_size,
                         global_batch_size=shapes.global_batch, dp_rank=parallel.dp_rank(), dp_size=parallel.dp_size(),
                         seed=cfg.data.seed, pad_id=data.manifest.get("pad_id", 1), prefetch=0)
    state = TrainState()
    guard, preemption = LossGuard(cfg.trainer, state), Preemption()
    drills = Drills.from_config(cfg.trainer.inject_nan_at_steps, {})
    rank = dist.get_rank()
    for name in COLLECTIVES:
        if hasattr(dist, name):
            _wrap(name)

    rows = []
    for step in range(1, shapes.total_steps + 1):
        preemption.requested = rank == 1 and step == 2
        batches = loader.next_global_batch()
        p0, l0, s0 = len(project_calls), len(library_calls), len(sent)
        result = train_step(engine, batches, device, step=step, guard=guard, preemption=preemption, drills=drills)
        rows.append({"step": step, "project_calls": project_calls[p0:], "library_calls": len(library_calls) - l0,
                     "sent": sent[s0:], "loss": result.loss, "skipped": result.skipped, "lr": result.lr,
                     "preempt": result.preempt, "samples": [b.sample_ids.tolist() for b in batches]})
    out = {"rank": rank, "world_size": dist.get_world_size(), "grad_accum": shapes.grad_accum,
           "total_steps": shapes.total_steps, "warmup_steps": info.warmup_steps, "lr_max": cfg.optim.lr_max,
           "skipped_steps": state.skipped_steps, "steps": rows}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
