"""Everything before the first step: config checks, the process group, data, model, engine, resume.

:func:`build_run` returns a :class:`Run` that :func:`pretrain.trainer.loop.fit` trains. The pieces are
public so that tools build exactly what training builds: :func:`check` (before any rendezvous),
:func:`build_engine` (the export test's and bench/train_step.py's engine) and :func:`restore`.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors import SafetensorError

from launch.env import DistEnv, check_topology
from model import parallel
from model.config import GalacticaConfig
from model.hf import load_full_state_dict, read_hf
from model.transformer import GalacticaLM
from pretrain.config import (HASHED_KEYS, ConfigError, TrainConfig, adopt_init_from, config_hash, global_batch_samples,
                             model_config, validate)
from pretrain.data.loader import EpochLoader, Stream, plan_streams, samples_per_epoch
from pretrain.data.shards import TrainSplit, data_identity, read_manifest
from pretrain.evaluation.validation import ValidationSchedule, Validator
from pretrain.trainer import checkpoint, engine as ds_engine
from pretrain.trainer.faults import Drills
from pretrain.trainer.guards import LossGuard, Preemption, TrainState
from pretrain.analysis.watch import DoubleDescentWatch
from pretrain.trainer.metrics import Metrics, SampleLog
from pretrain.trainer.progress import Progress
from pretrain.trainer.rundir import RunDirLock
from pretrain.trainer.schedule import refresh_lr
from pretrain.trainer.throughput import StepTimer, peak_flops


@dataclass(frozen=True)
class Shapes:
    """The run's batch arithmetic, fixed by the config, the shards and the world size."""

    seq_len: int
    num_samples: int  # global samples in one epoch (of the fastest-cycling source: pretrain/data/loader.py)
    global_batch: int  # sequences per optimizer step (all ranks)
    grad_accum: int  # micro-steps per optimizer step on each rank
    total_steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def tokens_per_epoch(self) -> int:
        return self.num_samples * self.seq_len


@dataclass
class Data:
    path: Path
    manifest: dict
    train: TrainSplit
    streams: list[Stream]  # the mixture (data.mixture, data.repeat) over train's sources


def check(cfg: TrainConfig, env: DistEnv) -> tuple[Data, GalacticaConfig, Shapes]:
    """Read the shards' manifest and index and check the config against them and the process layout:
    a bad config fails here, on every rank alike, before any rendezvous."""
    world_size = env.world_size
    check_topology(world_size, cfg.trainer.tensor_parallel, env.local_world_size,
                   gpus=pick_device(cfg, env).type == "cuda")
    resuming = resumable_shape(cfg)
    adopt_init_from(cfg.model, resuming)
    path = Path(cfg.data.path).resolve()
    cfg.data.path = str(path)  # absolute in the run's config.yaml: gal-export and gal-eval run from anywhere
    manifest = read_manifest(path)
    model_cfg = model_config(cfg, manifest)
    if cfg.model.init_from and resuming is None:
        check_vocabulary(Path(cfg.model.init_from), path, manifest, warn=env.rank == 0)
    train = TrainSplit(path, vocab_size=model_cfg.vocab_size)  # ids at or above it are named, shard and sample
    r = cfg.data.repeat
    streams = plan_streams({name: train.ids(name) for name in train.sources}, mixture=cfg.data.mixture,
                           repeat_source=r.source, repeat_samples=r.samples, repeat_fraction=r.fraction,
                           seed=cfg.data.seed)
    seq_len = train.sample_len - 1
    validate(cfg, seq_len=seq_len, model_cfg=model_cfg, world_size=world_size)
    t = cfg.trainer
    gbs = global_batch_samples(t.global_batch_tokens, seq_len)
    per_epoch = samples_per_epoch(streams)
    total_tokens = t.max_tokens if t.max_tokens is not None else int(t.max_epochs * per_epoch * seq_len)
    shapes = Shapes(seq_len=seq_len, num_samples=per_epoch, global_batch=gbs,
                    grad_accum=gbs // (t.micro_batch_size * (world_size // t.tensor_parallel)),
                    total_steps=max(1, math.ceil(total_tokens / (gbs * seq_len))))
    return Data(path, manifest, train, streams), model_cfg, shapes


def resumable_shape(cfg: TrainConfig) -> dict | None:
    """The model shape saved with the checkpoint ``resume=auto`` will load (None: a fresh start, or an
    explicit resume path, whose checkpoint is checked later by :func:`saved_layout`)."""
    if cfg.resume != "auto":
        return None
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    tag, _ = checkpoint.find_latest(ckpt_dir)
    return checkpoint.read_layout(ckpt_dir, tag).get("model_shape", {}) if tag else None


def check_vocabulary(folder: Path, data_path: Path, manifest: dict, warn: bool) -> None:
    """``model.init_from``: the shards must be tokenized with the checkpoint's tokenizer. When both have a
    tokenizer.json (the shards' is manifest["tokenizer"]["hf"]), the files are equal or their token → id
    tables are; without the checkpoint's tokenizer.json only the sizes are checked (model_config), with a
    warning."""
    from tokenizers import Tokenizer

    theirs = folder / "tokenizer.json"
    ours = data_path / manifest.get("tokenizer", {}).get("hf", "tokenizer/hf") / "tokenizer.json"
    if not theirs.is_file():
        if warn:
            print(f"warning: {folder} has no tokenizer.json: the shards' tokenizer cannot be checked against it, "
                  "only the vocabulary size", file=sys.stderr)
        return
    if not ours.is_file() or ours.read_bytes() == theirs.read_bytes():
        return
    a, b = (Tokenizer.from_file(str(p)).get_vocab(with_added_tokens=True) for p in (theirs, ours))
    if a != b:
        differ = sum(a.get(token) != i for token, i in b.items())
        raise ConfigError(f"data.path={data_path} was tokenized with another vocabulary than model.init_from="
                          f"{folder} ({differ} of the shards' {len(b)} tokens have another id or none there): "
                          f"prepare the shards with gal-prepare tokenizer.from_hf={folder}")


def pick_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    want = cfg.trainer.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device=cuda, but this process sees no CUDA GPU (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): use trainer.device=auto or cpu, "
                          "or run on a GPU node")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_distributed(cfg: TrainConfig, env: DistEnv) -> torch.device:
    """Join the process group (gloo on the CPU, NCCL on GPUs) with megatron's TP/DP groups."""
    if env.source != "single":
        env.export()
    else:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists; a single process needs no rendezvous
    device = pick_device(cfg, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel.init_distributed(cfg.trainer.tensor_parallel, backend="nccl" if device.type == "cuda" else "gloo")
    return device


@dataclass(frozen=True)
class EngineInfo:
    ds_config: dict
    warmup_steps: int
    params: int  # counted before ZeRO-3 partitions them
    flops_per_token: float


def build_engine(cfg: TrainConfig, model_cfg: GalacticaConfig, shapes: Shapes, device: torch.device,
                 load_universal: bool = False, init_from: str | None = None) -> tuple[object, EngineInfo]:
    """The model (seeded by ``seed``; with ``init_from``, a Hugging Face folder's weights) in the DeepSpeed
    engine, reading checkpoints with weights_only. Every rank loads the full weights and keeps its TP
    shard before DeepSpeed partitions them (ZeRO-3 included)."""
    parallel.manual_seed(cfg.seed)
    model = GalacticaLM(model_cfg)
    if init_from:
        load_hf_weights(model, init_from)
    params, flops = model.num_parameters(), model.flops_per_token(shapes.seq_len)
    if device.type == "cuda":
        model = model.to(device)
    engine, ds_config, warmup = ds_engine.build(
        cfg, model, micro_batch_size=cfg.trainer.micro_batch_size, grad_accum=shapes.grad_accum,
        tokens_per_step=shapes.tokens_per_step, total_steps=shapes.total_steps, device=device,
        load_universal=load_universal)
    checkpoint.use_weights_only_loading(engine)
    return engine, EngineInfo(ds_config, warmup, params, flops)


def load_hf_weights(model: GalacticaLM, folder: str) -> None:
    """``model.init_from``: the folder's weights into the model (built from the same folder's config.json
    by :func:`pretrain.config.adopt_init_from`)."""
    try:
        load_full_state_dict(model, read_hf(folder)[1])
    except (OSError, ValueError, pickle.UnpicklingError, SafetensorError) as e:
        raise ConfigError(f"model.init_from={folder}: {e}") from None


def client_state(loader: EpochLoader, state: TrainState, cfg: TrainConfig, cfg_hash: str) -> dict:
    """What a checkpoint carries beside DeepSpeed's own state (RNG states are added by checkpoint.save)."""
    return {"loader": loader.state_dict(), "train_state": asdict(state), "config_hash": cfg_hash, "seed": cfg.seed,
            "universal_checkpoint_info": {}}


def restore(engine, loader: EpochLoader, start: tuple[Path, str], universal: bool, cfg: TrainConfig,
            cfg_hash: str) -> TrainState:
    """Load a checkpoint into the engine and loader; returns the loop's counters."""
    where = start[0] / start[1]
    client = checkpoint.load(engine, checkpoint.to_universal(*start) if universal else start[0], start[1])
    try:
        loader.load_state_dict(client["loader"])
    except ValueError as e:
        raise ConfigError(f"{where}: {e}; resume with the checkpoint's data settings, or start a new run "
                          "(another run_dir, or resume=none)") from None
    refresh_lr(engine)
    if dist.get_rank() == 0:
        if client.get("seed", cfg.seed) != cfg.seed:
            print(f"warning: seed={cfg.seed}, but {where} was trained with seed={client['seed']}: the run goes on "
                  "with the checkpoint's RNG states (a new seed takes a new run)", file=sys.stderr)
        elif client.get("config_hash") != cfg_hash:
            print(f"warning: resuming {where} with changed training data or settings "
                  f"({', '.join(HASHED_KEYS)}, or the shards' content)", file=sys.stderr)
    return TrainState(**client["train_state"])


def saved_layout(cfg: TrainConfig, model_cfg: GalacticaConfig, start: tuple[Path, str] | None) -> bool:
    """Whether the checkpoint to resume needs DeepSpeed's universal format (another data-parallel
    size); another tensor-parallel size or model shape is an error, before anything loads."""
    if start is None:
        return False
    where = start[0] / start[1]
    saved = checkpoint.read_layout(*start)
    if saved["tp_size"] != cfg.trainer.tensor_parallel:
        raise ConfigError(f"trainer.tensor_parallel={cfg.trainer.tensor_parallel}, but {where} was "
                          f"saved with tensor parallelism {saved['tp_size']}: resume with the same TP size")
    if saved.get("zero_stage", cfg.deepspeed.zero_stage) != cfg.deepspeed.zero_stage:
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}, but {where} was saved under ZeRO stage "
                          f"{saved['zero_stage']}, whose optimizer shards another stage cannot read: resume with "
                          f"deepspeed=zero{saved['zero_stage']} (the stage changes only with a new run)")
    changed = {k: (v, getattr(model_cfg, k)) for k, v in saved.get("model_shape", {}).items()
               if v != getattr(model_cfg, k)}
    if changed:
        keys = ", ".join(f"model.{k}={new} (saved: {old})" for k, (old, new) in changed.items())
        raise ConfigError(f"{keys}: {where} holds a model of another shape; resume with its shape, "
                          "or start a new run (another run_dir, or resume=none)")
    return saved["dp_size"] != parallel.dp_size()


@dataclass
class Run:
    """A training run ready for its first (or next) step: what :func:`pretrain.trainer.loop.fit` uses."""

    cfg: TrainConfig
    model_cfg: GalacticaConfig
    run_dir: Path
    device: torch.device
    shapes: Shapes
    engine: object  # deepspeed.DeepSpeedEngine
    loader: EpochLoader
    validator: Validator
    schedule: ValidationSchedule
    state: TrainState
    guard: LossGuard
    preemption: Preemption
    drills: Drills
    metrics: Metrics
    timer: StepTimer
    sample_log: SampleLog | None
    progress: Progress
    watch: DoubleDescentWatch | None  # on the main rank, with validation on
    config_hash: str
    lineage: checkpoint.Lineage  # which checkpoints pruning may delete
    lock: RunDirLock | None  # one trainer per run directory (held by the main rank)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def build_run(cfg: TrainConfig, run_dir: Path, env: DistEnv) -> Run:
    """Check, join, build, restore, and open the run directory's records (config, metrics, wandb)."""
    data, model_cfg, shapes = check(cfg, env)
    drills = Drills.from_config(cfg.trainer.inject_nan_at_steps)
    device = init_distributed(cfg, env)
    lock = take_run_dir(run_dir)
    try:
        start = checkpoint.resume_point(cfg.resume, run_dir / "checkpoints")
        universal = saved_layout(cfg, model_cfg, start)
        engine, info = build_engine(cfg, model_cfg, shapes, device, load_universal=universal,
                                    init_from=None if start else cfg.model.init_from)
        loader = EpochLoader(data.train, data.streams, micro_batch_size=cfg.trainer.micro_batch_size, global_batch_size=shapes.global_batch,
                             dp_rank=parallel.dp_rank(), dp_size=parallel.dp_size(), seed=cfg.data.seed,
                             pad_id=data.manifest.get("pad_id", 1), prefetch=cfg.data.prefetch)
        cfg_hash = config_hash(cfg, data_identity(data.path, data.manifest))
        state = restore(engine, loader, start, universal, cfg, cfg_hash) if start else TrainState()
        is_main = dist.get_rank() == 0
        if is_main:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            (run_dir / "deepspeed_config.json").write_text(json.dumps(info.ds_config, indent=2))
        metrics = Metrics(run_dir, enabled=is_main, config=asdict(cfg), logger=cfg.logger, resume_step=state.step)
        precision, precision_why = ds_engine.choose_precision(cfg, device)
        peak, peak_source = peak_flops(device, precision)
        metrics.event("start", step=state.step, tokens_seen=state.tokens_seen, params=info.params,
                      world_size=dist.get_world_size(), dp_size=parallel.dp_size(), tp_size=parallel.tp_size(),
                      zero_stage=cfg.deepspeed.zero_stage, global_batch=shapes.global_batch, grad_accum=shapes.grad_accum,
                      seq_len=shapes.seq_len, total_steps=shapes.total_steps, warmup_steps=info.warmup_steps,
                      train_samples=shapes.num_samples, device=str(device), resumed=bool(start),
                      init_from=None if start else cfg.model.init_from,
                      precision=precision, precision_why=precision_why, mfu_peak=peak_source,
                      drills=drills.active)
        schedule = ValidationSchedule(cfg.validation, shapes.tokens_per_epoch)
        validator = Validator(cfg.validation, data.path, data.manifest, data.train, data.streams, seed=cfg.data.seed,
                              seq_len=shapes.seq_len, tokens_between_rounds=schedule.tokens_between_rounds)
        return Run(cfg=cfg, model_cfg=model_cfg, run_dir=run_dir, device=device, shapes=shapes, engine=engine, loader=loader,
                   validator=validator, schedule=schedule, state=state,
                   guard=LossGuard(cfg.trainer, state), preemption=Preemption(), drills=drills, metrics=metrics,
                   timer=StepTimer(info.flops_per_token, peak, dist.get_world_size()),
                   sample_log=SampleLog(run_dir / "sample_ids.jsonl", state.step) if cfg.data.record_sample_ids else None,
                   progress=Progress(metrics.console, shapes.total_steps, state.step, enabled=is_main),
                   watch=DoubleDescentWatch(run_dir / "metrics.jsonl") if is_main and cfg.validation.enabled else None,
                   config_hash=cfg_hash, lineage=checkpoint.Lineage(resumed_from=_own_tag(start, run_dir)), lock=lock)

    except BaseException:
        if lock is not None:  # a run that failed to start leaves the directory free
            lock.release()
        raise

def take_run_dir(run_dir: Path) -> RunDirLock | None:
    """The main rank takes the run directory's lock (pretrain/trainer/rundir.py); if another trainer
    holds it, every rank stops with the same one-line error. Returns the lock on the main rank."""
    lock, error = None, [None]
    if dist.get_rank() == 0:
        try:
            lock = RunDirLock(run_dir).acquire()
        except ConfigError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise ConfigError(error[0])
    return lock


def _own_tag(start: tuple[Path, str] | None, run_dir: Path) -> str | None:
    """The tag resumed from, if it lies in this run's own checkpoint directory (the run's line)."""
    own = start is not None and Path(start[0]).resolve() == (run_dir / "checkpoints").resolve()
    return start[1] if own else None
