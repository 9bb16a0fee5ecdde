"""Checkpoints: DeepSpeed's own save/load, plus what DeepSpeed does not know about.

Layout: ``RUN_DIR/checkpoints/step00000042/`` (a DeepSpeed tag: model, ZeRO and optimizer shards of
every rank, ``gal_layout.json``, and ``gal_complete.json``) and ``RUN_DIR/checkpoints/latest`` (the tag
of the newest complete checkpoint).

* A checkpoint counts only when complete: every rank has written its shards (a barrier), then rank 0
  writes the layout file and the tag's own completion marker ``gal_complete.json`` (every file's size),
  fsynced, and last replaces ``latest`` atomically (``os.replace``). A process killed mid-write leaves an incomplete tag
  that nothing loads. (DeepSpeed's own ``save_latest`` writes the pointer on rank 0 without waiting for
  the other ranks, so we write it ourselves.)
* ``resume=auto`` takes the tag ``latest`` names when that tag is complete, and otherwise the newest
  complete tag, saying why (``latest`` missing, empty, garbage or naming an incomplete tag): a lost
  ``latest`` loses nothing.
* Pruning (``keep_last``) only ever deletes complete checkpoints of the run's own line: those at or
  before the checkpoint it resumed from, and those it wrote itself. A complete checkpoint newer than
  the resume point that this run did not write (e.g. ``resume=none`` in a directory that has some) is
  never deleted; incomplete tags after the resume point (a killed write) are.
* Client state: the loader position, tokens seen, the loss guard, the config hash, and every rank's
  RNG states (torch, CUDA, numpy, python, the tensor-parallel stream), gathered to the file
  DeepSpeed writes, so that a resumed run draws the same dropout masks as an uninterrupted one.
* Only the last ``keep_last`` checkpoints are kept.
* Files are read with ``torch.load(weights_only=True)``: DeepSpeed's checkpoint engine is told to, and
  DeepSpeed's converters (``ds_to_universal`` for a resume on another data-parallel size,
  ``zero_to_fp32`` in gal-export), which ask for ``weights_only=False``, run under
  :func:`weights_only_loading`. A pickled payload in a checkpoint file is refused, never executed.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
from dataclasses import dataclass, field
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from model import parallel

LATEST = "latest"
META = "gal_layout.json"  # world, data- and tensor-parallel sizes, ZeRO stage of the saving run
COMPLETE = "gal_complete.json"  # written last into a tag: every file's size


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def damage(tag_dir: Path) -> str | None:
    """Why a tag is not a complete checkpoint, naming the file; None when it is complete: its marker is
    there and every file it lists has its recorded size (a tag from before markers existed counts when its
    layout file, written after every rank's shards, is there)."""
    tag_dir = Path(tag_dir)
    marker = tag_dir / COMPLETE
    if not marker.exists():
        return None if (tag_dir / META).is_file() else f"incomplete (no {COMPLETE}: its writing was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
        for name, size in files.items():
            path = tag_dir / name
            if not path.is_file():
                return f"damaged: {path} is missing"
            if path.stat().st_size != size:
                return f"damaged: {path} is {path.stat().st_size} bytes, {size} when written (truncated?)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"damaged: {marker} is unreadable"
    return None


def is_complete(tag_dir: Path) -> bool:
    return damage(tag_dir) is None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The complete checkpoints' tags, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir()) if ckpt_dir.is_dir() else []
    return [t for t in tags if is_complete(ckpt_dir / t)]


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint's tag (the one ``latest`` names if complete), or None."""
    return find_latest(ckpt_dir)[0]


def find_latest(ckpt_dir: Path) -> tuple[str | None, str | None]:
    """(tag, why): the tag ``latest`` names when it is complete (why None), else the newest complete tag
    and why ``latest`` was not used; (None, None) when there is no complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    named = None
    if pointer.is_file():
        try:
            named = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = None
    if named and "/" not in named and is_complete(ckpt_dir / named):
        return named, None
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None, None
    if not pointer.exists():
        why = f"{pointer} is missing"
    elif not named:
        why = f"{pointer} is empty or unreadable"
    elif not (ckpt_dir / named).is_dir():
        why = f"{pointer} names {named[:60]!r}, which is not a checkpoint there"
    else:
        why = f"{pointer} names {named!r}, which is {damage(ckpt_dir / named)}"
    return tags[-1], why


# ---- RNG -------------------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[0], "pos": np_state[2], "has_gauss": np_state[3], "gauss": np_state[4],
                  "keys": torch.from_numpy(np_state[1].astype(np.int64))},
        "python": _to_lists(random.getstate()),
        "tensor_parallel": parallel.tp_rng().get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    parallel.tp_rng().set_state(state["tensor_parallel"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state, on every rank (only the files of some ranks carry client state)."""
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


# ---- save / load -------------------------------------------------------------------------------------
def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int, *, model_shape: dict,
         lineage: "Lineage", before_commit: Callable[[int], None] | None = None) -> str:
    """Save on all ranks; returns the tag. The completion marker and ``latest`` are written only after
    every rank has finished. ``model_shape`` goes to the layout file, read before a resume loads
    anything; ``before_commit(step)`` runs on rank 0 between the shards and the marker (the fault
    drills); ``lineage`` says which checkpoints pruning may delete."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    client_state = {**client_state, "rng": gather_rng_states(), "world_size": dist.get_world_size()}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        if before_commit is not None:
            before_commit(step)
        (ckpt_dir / tag / META).write_text(json.dumps({**layout(engine), "model_shape": model_shape}))
        _fsync_tree(ckpt_dir / tag)
        _write_marker(ckpt_dir / tag)
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
        lineage.written.append(tag)
        lineage.prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag


def _write_marker(tag_dir: Path) -> None:
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != COMPLETE}
    tmp = tag_dir / f".{COMPLETE}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, tag_dir / COMPLETE)


PRUNING = ".pruning."  # a tag being deleted (Lineage.prune)


@dataclass
class Lineage:
    """The checkpoints a run may prune: those up to the one it resumed from, and those it wrote."""

    resumed_from: str | None = None
    written: list[str] = field(default_factory=list)

    def prune(self, ckpt_dir: Path, keep_last: int) -> list[str]:
        """Keep the newest ``keep_last`` of the run's own complete checkpoints; drop incomplete tags after
        the resume point (writes killed in an earlier life of this run). Returns what was deleted.

        A tag is first renamed out of sight (``.pruning.<tag>``, atomic) and then deleted, so that a kill
        during the deletion leaves no half-deleted tag; the next prune finishes such leftovers."""
        ckpt_dir = Path(ckpt_dir)
        for leftover in ckpt_dir.glob(PRUNING + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
        complete = {t: is_complete(ckpt_dir / t) for t in tags}
        mine = [t for t in tags if complete[t]
                and (t in self.written or (self.resumed_from is not None and t <= self.resumed_from))]
        stale = mine[:-max(keep_last, 1)]
        stale += [t for t in tags if t > (self.resumed_from or "") and not complete[t]]
        for old in stale:
            gone = ckpt_dir / (PRUNING + old)
            os.replace(ckpt_dir / old, gone)
            shutil.rmtree(gone, ignore_errors=True)
        return stale


def layout(engine) -> dict:
    return {"world_size": dist.get_world_size(), "dp_size": parallel.dp_size(), "tp_size": parallel.tp_size(),
            "zero_stage": engine.zero_optimization_stage()}


def resume_point(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """Where ``resume=`` (auto | none | a checkpoint dir) points: (checkpoint dir, tag), or None for a
    fresh start."""
    from pretrain.config import ConfigError

    if resume == "none":
        return None
    if resume == "auto":
        tag, why = find_latest(ckpt_dir)
        if why and dist.get_rank() == 0:
            print(f"warning: {why}; resuming from the newest complete checkpoint, {Path(ckpt_dir) / tag}",
                  file=sys.stderr)
        return (Path(ckpt_dir), tag) if tag else None
    path = Path(resume)
    if (path / LATEST).exists() or complete_tags(path):
        tag, why = find_latest(path)
        if tag is None:
            raise ConfigError(f"resume={resume}: no complete checkpoint there")
        return path, tag
    if path.is_dir() and is_complete(path):
        return path.parent, path.name
    if path.is_dir() and path.name.startswith("step"):
        raise ConfigError(f"resume={resume}: {damage(path)}; {_previous(path.parent, path.name)}")
    raise ConfigError(f"resume={resume}: no checkpoint there")


def read_layout(ckpt_dir: Path, tag: str) -> dict:
    path = Path(ckpt_dir) / tag / META
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {Path(ckpt_dir) / tag} was not written by gal-train")
    return json.loads(path.read_text())


def to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Convert a checkpoint with DeepSpeed's ``ds_to_universal`` (rank 0; the others wait) so that it
    loads on another data-parallel size; returns the directory that holds the converted ``tag``."""
    out = Path(ckpt_dir) / "universal"
    if dist.get_rank() == 0 and not (out / tag / "zero").is_dir():
        cmd = [sys.executable, "-m", "pretrain.trainer.to_universal", "--input_folder",
               str(Path(ckpt_dir) / tag), "--output_folder", str(out / tag), "--num_extract_workers", "1",
               "--num_merge_workers", "1", "--no_strict"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"ds_to_universal failed on {Path(ckpt_dir) / tag}:\n{proc.stderr[-3000:]}")
    dist.barrier()
    return out


def load(engine, ckpt_dir: Path, tag: str | None = None) -> dict:
    """Load engine, optimizer and scheduler state; restore this rank's RNG; return the client state."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir} (no '{LATEST}' file)")
    try:
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        from pretrain.config import ConfigError

        bad = unreadable_file(ckpt_dir / tag) or (ckpt_dir / tag, e)
        raise ConfigError(f"{bad[0]}: unreadable ({_first_line(bad[1])}); {_previous(ckpt_dir, tag)}") from e
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    if client_state.get("world_size") == dist.get_world_size():
        set_rng_state(client_state["rng"][dist.get_rank()])
    return client_state


def unreadable_file(tag_dir: Path) -> tuple[Path, Exception] | None:
    """The first of a tag's files that ``torch.load(weights_only=True)`` cannot read, with its error."""
    _allow_deepspeed_globals()
    for path in sorted(Path(tag_dir).rglob("*.pt")):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (any failure names the file)
            return path, e
    return None


def _previous(ckpt_dir: Path, tag: str) -> str:
    """What to resume from instead of ``tag``: the newest complete checkpoint before it."""
    older = [t for t in complete_tags(ckpt_dir) if t < tag]
    if older:
        return f"resume from the previous complete checkpoint: resume={Path(ckpt_dir) / older[-1]}"
    return "no earlier complete checkpoint is there: start again with resume=none"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


@contextlib.contextmanager
def weights_only_loading():
    """Every ``torch.load`` inside reads with ``weights_only=True`` (plus DeepSpeed's few checkpoint
    types), whatever its caller asked for: for DeepSpeed code that asks for ``weights_only=False``."""
    _allow_deepspeed_globals()
    real = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def use_weights_only_loading(engine) -> None:
    """Make DeepSpeed's checkpoint engine read files with ``torch.load(weights_only=True)``."""
    ce = engine.checkpoint_engine

    def load(path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load
    _allow_deepspeed_globals()


def _allow_deepspeed_globals() -> None:
    """The few non-tensor types DeepSpeed pickles into its checkpoint files."""
    safe = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        safe.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        safe += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    from deepspeed.utils.tensor_fragment import fragment_address
    safe.append(fragment_address)
    torch.serialization.add_safe_globals(safe)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())


