"""gal-train: pretrain a Galactica model with DeepSpeed. The training loop is in this file.

    gal-train                                   # tiny model, built-in sample shards, CPU
    gal-train model=125m deepspeed=zero3 data.path=/shards trainer.max_tokens=450e9
    torchrun --nproc-per-node=8 -m pretrain.train model=1.3b trainer.tensor_parallel=2
    srun python -m pretrain.train ...           # rank and world from SLURM (launch/env.py)

A batch from shard to loss: ``EpochLoader`` (pretrain/data/loader.py) picks this rank's samples of
the next global batch from the epoch's permutation and reads them from the shards through their
index → ``engine(input_ids, labels)`` is ``GalacticaLM.forward`` (model/transformer.py) returning the
mean cross-entropy → ``engine.backward`` / ``engine.step`` (DeepSpeed: ZeRO, clipping, AdamW, LR).

Exit codes: 0 done; ``EXIT_PREEMPTED`` (75) after SIGUSR1/SIGTERM and a checkpoint (requeue me);
``EXIT_LOSS_GUARD`` (3) after ``trainer.max_consecutive_skips`` bad steps in a row (checkpointed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import math
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launch.env import check_topology, detect
from model import parallel
from model.config import GalacticaConfig
from model.transformer import GalacticaLM
from pretrain import checkpoint, engine as ds_engine
from pretrain.config import ConfigError, TrainConfig, global_batch_samples, register, validate
from pretrain.data.loader import EpochLoader
from pretrain.data.shards import ShardReader
from pretrain.metrics import Metrics, StepTimer, is_tty, peak_flops
from pretrain.validation import DoubleDescentWatch, Validator

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" (slurm/pretrain.sbatch requeues on it)
EXIT_LOSS_GUARD = 3

register()


@dataclass
class TrainState:
    step: int = 0  # optimizer steps, skipped ones included
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    loss_ewma: float | None = None
    ewma_steps: int = 0


class LossGuard:
    """Skip the update when the loss is not finite or spikes above ``factor`` × its EWMA (metaseq's
    skip_spike). All ranks decide on the same all-reduced loss, so they skip together."""

    def __init__(self, cfg, state: TrainState):
        self.factor, self.beta, self.warmup = cfg.loss_spike_factor, cfg.loss_ewma_beta, cfg.loss_spike_warmup_steps
        self.state = state

    def is_bad(self, loss: float) -> str | None:
        s = self.state
        if not math.isfinite(loss):
            return "non-finite loss"
        if s.loss_ewma is not None and s.ewma_steps >= self.warmup and loss > self.factor * s.loss_ewma:
            return f"loss spike ({loss:.4g} > {self.factor} × EWMA {s.loss_ewma:.4g})"
        return None

    def update(self, loss: float, bad: str | None) -> None:
        s = self.state
        if bad:
            s.skipped_steps += 1
            s.consecutive_skips += 1
            return
        s.consecutive_skips = 0
        s.loss_ewma = loss if s.loss_ewma is None else self.beta * s.loss_ewma + (1 - self.beta) * loss
        s.ewma_steps += 1


class Preemption:
    """SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (scancel, preemption): finish the
    step, checkpoint, exit with EXIT_PREEMPTED. Ranks agree through an all-reduce of the flag."""

    def __init__(self):
        self.requested = False
        self.pause_at = os.environ.get("GAL_FAULT_PAUSE")  # see wait_at
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def wait_at(self, step: int, timeout_s: float = 600.0) -> None:
        """Drills and tests: with ``GAL_FAULT_PAUSE=step:N`` every rank waits after step N until the
        signal arrives, so a preemption lands at a known step however fast the machine is."""
        if self.pause_at == f"step:{step}":
            deadline = time.monotonic() + timeout_s
            while not self.requested and time.monotonic() < deadline:
                time.sleep(0.05)

    def agreed(self, device) -> bool:
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def config_hash(cfg: DictConfig) -> str:
    """What must not change across a resume: the model, data and optimizer settings."""
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data", "optim")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    want = cfg.trainer.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def wandb_group(cfg: TrainConfig) -> str | None:
    """logger.group, or in a multirun (-m) the sweep directory's name, so that a sweep's points group."""
    if cfg.logger.group or not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return cfg.logger.group
    return Path(HydraConfig.get().sweep.dir).name


def read_manifest(data_path: Path) -> dict:
    manifest = data_path / "manifest.json"
    if not manifest.exists():
        raise ConfigError(f"data.path={data_path}: no manifest.json there; prepare shards with gal-prepare")
    return json.loads(manifest.read_text())


def model_config(cfg: TrainConfig, manifest: dict) -> GalacticaConfig:
    """model.size with the run's overrides; the vocabulary from the shards' manifest unless model.vocab_size."""
    m = cfg.model
    overrides = dict(n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads,
                     vocab_size=m.vocab_size or manifest["vocab_size"], dropout=m.dropout,
                     attention_dropout=m.attention_dropout, activation_checkpointing=m.activation_checkpointing)
    return GalacticaConfig.from_name(m.size, **{k: v for k, v in overrides.items() if v is not None})


def resume_dir(cfg: TrainConfig, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(checkpoint dir, tag) to resume from, or None for a fresh start."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        tag = checkpoint.latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = Path(cfg.resume)
    if (path / checkpoint.LATEST).exists():
        return path, checkpoint.latest_tag(path)
    if path.is_dir():
        return path.parent, path.name
    raise ConfigError(f"resume={cfg.resume}: no checkpoint there")


def run(cfg: DictConfig) -> int:
    env = detect()
    if env.source != "single":
        env.export()
    else:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists; a single process needs no rendezvous
    typed: TrainConfig = OmegaConf.to_object(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    t = typed.trainer

    device = pick_device(typed, env.local_rank)
    check_topology(env.world_size, t.tensor_parallel, env.local_world_size, gpus=device.type == "cuda")
    parallel.init_distributed(t.tensor_parallel, backend="nccl" if device.type == "cuda" else "gloo")
    is_main = dist.get_rank() == 0

    # ---- data and model shapes, checked before anything is built
    data_path = Path(typed.data.path)
    manifest = read_manifest(data_path)
    train_samples = ShardReader(data_path / "train")
    seq_len = train_samples.sample_len - 1
    model_cfg = model_config(typed, manifest)
    validate(typed, seq_len=seq_len, num_heads=model_cfg.n_heads, d_model=model_cfg.d_model,
             world_size=dist.get_world_size(), max_positions=model_cfg.max_positions)
    dp_rank, dp_size = parallel.dp_rank(), parallel.dp_size()
    gbs = global_batch_samples(typed, seq_len)
    grad_accum = gbs // (t.micro_batch_size * dp_size)
    tokens_per_step = gbs * seq_len
    total_tokens = t.max_tokens or int(t.max_epochs * len(train_samples) * seq_len)
    total_steps = max(1, math.ceil(total_tokens / tokens_per_step))

    # ---- model, engine, loader
    parallel.manual_seed(typed.seed)
    model = GalacticaLM(model_cfg)
    n_params, flops_per_token = model.num_parameters(), model.flops_per_token(seq_len)  # before ZeRO-3 partitions
    if device.type == "cuda":
        model = model.to(device)
    start = resume_dir(typed, ckpt_dir)
    universal = False
    if start:
        saved = checkpoint.read_layout(*start)
        if saved["tp_size"] != t.tensor_parallel:
            raise ConfigError(f"trainer.tensor_parallel={t.tensor_parallel}, but {start[0] / start[1]} was saved "
                              f"with tensor parallelism {saved['tp_size']}: resume with the same TP size")
        universal = saved["dp_size"] != dp_size  # another data-parallel size: DeepSpeed's universal checkpoint
    engine, ds_config, warmup_steps = ds_engine.build(
        typed, model, micro_batch_size=t.micro_batch_size, grad_accum=grad_accum,
        tokens_per_step=tokens_per_step, total_steps=total_steps, device=device, load_universal=universal)
    checkpoint.use_weights_only_loading(engine)
    loader = EpochLoader(train_samples, micro_batch_size=t.micro_batch_size, global_batch_size=gbs,
                         dp_rank=dp_rank, dp_size=dp_size, seed=typed.data.seed,
                         pad_id=manifest.get("pad_id", 1), prefetch=typed.data.prefetch)
    validator = Validator(typed.validation, data_path, train_samples, seed=typed.data.seed,
                          pad_id=manifest.get("pad_id", 1), tokens_per_epoch=len(train_samples) * seq_len)
    watch = DoubleDescentWatch(run_dir / "metrics.jsonl")
    state = TrainState()
    if start:
        client = checkpoint.load(engine, checkpoint.to_universal(*start) if universal else start[0], start[1])
        loader.load_state_dict(client["loader"])
        ds_engine.refresh_lr(engine)
        state = TrainState(**client["train_state"])
        if client.get("config_hash") != config_hash(cfg) and is_main:
            print(f"warning: resuming {start[0] / start[1]} with a changed model/data/optim config", file=sys.stderr)

    if is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
    metrics = Metrics(run_dir, enabled=is_main, config=OmegaConf.to_container(cfg, resolve=True),
                      use_wandb=typed.logger.wandb, project=typed.logger.project, group=wandb_group(typed),
                      name=typed.logger.name, console=typed.logger.console, resume_step=state.step)
    metrics.event("start", step=state.step, tokens_seen=state.tokens_seen, params=n_params,
                  world_size=dist.get_world_size(), dp_size=dp_size, tp_size=t.tensor_parallel,
                  zero_stage=typed.deepspeed.zero_stage, global_batch=gbs, grad_accum=grad_accum,
                  seq_len=seq_len, total_steps=total_steps, warmup_steps=warmup_steps,
                  train_samples=len(train_samples), device=str(device), resumed=bool(start))

    sample_log = SampleLog(run_dir / "sample_ids.jsonl", state.step) if typed.data.record_sample_ids else None
    guard, preempt = LossGuard(t, state), Preemption()
    timer = StepTimer(flops_per_token, peak_flops(device), dist.get_world_size())
    client_state = lambda: {"loader": loader.state_dict(), "train_state": asdict(state),  # noqa: E731
                            "config_hash": config_hash(cfg), "universal_checkpoint_info": {}}
    next_ckpt = _next_multiple(state.tokens_seen, typed.checkpoint.interval_tokens)
    progress = _Progress(metrics, total_steps, state.step, enabled=is_main and typed.logger.console)
    exit_code = 0

    def validation_round(reason: str) -> None:
        result = validator.run(engine, device)
        metrics.validation(step=state.step, tokens_seen=state.tokens_seen, epoch=loader.epoch,
                           repeat=math.floor(loader.epoch), reason=reason, **result)

    if typed.validation.enabled and typed.validation.at_start:  # a fresh model's, or a loaded checkpoint's
        validation_round("start")

    # ---- the loop
    while state.step < total_steps:
        batches = loader.next_global_batch()
        if sample_log:
            sample_log.write(state.step + 1, batches)
        micro_losses = []
        for j, batch in enumerate(batches):
            loss = engine(batch.input_ids.to(device), batch.labels.to(device))
            micro_losses.append(loss.detach().float())
            if j == len(batches) - 1:  # decide on the global batch's loss before its last backward
                step_loss = _global_mean(torch.stack(micro_losses).mean())
                if state.step + 1 in t.inject_nan_at_steps:
                    step_loss = float("nan")
                bad = guard.is_bad(step_loss)
                lr = engine.get_lr()[0]  # the rate this update uses (the scheduler steps inside engine.step)
                if bad:  # a non-finite gradient makes DeepSpeed discard the accumulated step itself
                    loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
        if bad and engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an update the loss guard rejected")
        guard.update(step_loss, bad)
        state.step += 1
        state.tokens_seen += tokens_per_step
        timer.add(tokens_per_step)

        epoch_before = math.floor((loader.consumed_samples - gbs) / loader.num_samples)
        if state.step % t.log_interval_steps == 0 or bad or state.step == total_steps:
            tps, mfu = timer.read()
            row = {"step": state.step, "tokens_seen": state.tokens_seen, "epoch": loader.epoch,
                   "unique_tokens_seen": min(loader.consumed_samples, loader.num_samples) * seq_len,
                   "repeat": float(sum(b.epochs.mean() for b in batches) / len(batches)),
                   "loss": step_loss, "lr": lr, "grad_norm": _grad_norm(engine),
                   "tokens_per_s": tps, "mfu": mfu, "skipped_steps": state.skipped_steps}
            if bad:
                row["skipped"] = bad
            metrics.log(row)
            progress.update(row)
        if math.floor(loader.epoch) > epoch_before:
            metrics.event("epoch_end", step=state.step, tokens_seen=state.tokens_seen,
                          epoch=math.floor(loader.epoch), loss=step_loss)

        why = validator.reason(state.tokens_seen - tokens_per_step, state.tokens_seen)
        if why:
            validation_round(why)
            verdict = watch.update() if is_main else None
            if verdict:
                metrics.event("double_descent", step=state.step, tokens_seen=state.tokens_seen,
                              series="aggregate", **verdict)

        checkpoint.fault_point("step", state.step)
        preempt.wait_at(state.step)
        if state.consecutive_skips >= t.max_consecutive_skips:
            metrics.event("stopped", step=state.step, reason=f"{state.consecutive_skips} bad steps in a row "
                          f"(trainer.max_consecutive_skips={t.max_consecutive_skips}); last: {bad}")
            exit_code = EXIT_LOSS_GUARD
            break
        if preempt.agreed(device):
            metrics.event("preempted", step=state.step, tokens_seen=state.tokens_seen)
            exit_code = EXIT_PREEMPTED
            break
        if next_ckpt is not None and state.tokens_seen >= next_ckpt and state.step < total_steps:
            tag = checkpoint.save(engine, ckpt_dir, state.step, client_state(), typed.checkpoint.keep_last)
            metrics.event("checkpoint", step=state.step, tokens_seen=state.tokens_seen, tag=tag)
            next_ckpt = _next_multiple(state.tokens_seen, typed.checkpoint.interval_tokens)

    tag = checkpoint.save(engine, ckpt_dir, state.step, client_state(), typed.checkpoint.keep_last)
    metrics.event("checkpoint", step=state.step, tokens_seen=state.tokens_seen, tag=tag)
    if exit_code == 0:
        metrics.event("done", step=state.step, tokens_seen=state.tokens_seen, epoch=loader.epoch)
    progress.close()
    loader.close()
    metrics.close()
    dist.barrier()
    return exit_code


class SampleLog:
    """Which samples (dataset indices, all ranks) each step trained on: audits "no repeat, no skip"."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if dist.get_rank() == 0:
            rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
            path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= resume_step))

    def write(self, step: int, batches) -> None:
        mine = [int(i) for b in batches for i in b.sample_ids] if parallel.tp_rank() == 0 else []
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if dist.get_rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "ids": [i for ids in everyone for i in ids]}) + "\n")


def _next_multiple(tokens: int, interval: int | None) -> int | None:
    return None if not interval else (tokens // interval + 1) * interval


def _global_mean(x: torch.Tensor) -> float:
    """Mean over data-parallel ranks (tensor-parallel ranks hold the same loss already)."""
    x = x.clone()
    dist.all_reduce(x, group=parallel.dp_group())
    return x.item() / parallel.dp_size()


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm.item() if torch.is_tensor(norm) else norm)
    return norm if math.isfinite(norm) else None


class _Progress:
    """A rich progress line on a terminal; on a log file (SLURM) a plain line every ~2% of the run."""

    def __init__(self, metrics: Metrics, total: int, done: int, enabled: bool):
        self.metrics, self.total, self.enabled = metrics, total, enabled
        self.every = max(1, total // 50)
        self.t0, self.done0 = time.perf_counter(), done
        self.bar = None
        if enabled and is_tty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                                console=metrics.console)
            self.task = self.bar.add_task("", total=total, completed=done)
            self.bar.start()

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        loss = row["loss"] if row["loss"] is not None and math.isfinite(row["loss"]) else float("nan")
        text = (f"step {row['step']}/{self.total} epoch {row['epoch']:.2f} loss {loss:.4f} lr {row['lr']:.2e} "
                f"{row['tokens_per_s']:.0f} tok/s MFU {100 * row['mfu']:.1f}%")
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], description=text)
        elif row["step"] % self.every == 0 or row["step"] == self.total:
            rate = (row["step"] - self.done0) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - row["step"]) / max(rate, 1e-9)
            self.metrics.print(f"{text} ETA {eta / 60:.1f} min")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# An absolute path: under a console script Hydra would resolve "../conf" as a Python package.
@hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code == EXIT_PREEMPTED and os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and dist.get_rank() == 0:
        # a sweep point (hydra/launcher=slurm): requeue the job; its rerun resumes from the checkpoint
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False, timeout=60)
    if code:
        sys.exit(code)


def main() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _hydra_main()


if __name__ == "__main__":
    main()
