"""gal-export: a gal-train checkpoint → a Hugging Face ``OPTForCausalLM`` folder with the run's tokenizer.

    gal-export RUN_DIR OUT_DIR                      # the latest complete checkpoint
    gal-export RUN_DIR OUT_DIR --tag step00000042   # a named one

Any ZeRO stage and TP size, in one plain process (no torchrun, no GPU):

1. each TP rank's shards are consolidated to a full-DP fp32 state dict with DeepSpeed's own
   ``zero_to_fp32`` (it globs every ``*_optim_states.pt`` of a tag, so each TP rank gets a temporary
   tag of symlinks to its ``*mp_rank_XX_*`` files); a ZeRO-0 checkpoint has no optimizer shards and
   its model file already holds the full weights;
2. the TP ranks are merged with ``model.hf.merge_tp_state_dicts``;
3. the model config is rebuilt from ``RUN_DIR/config.yaml`` as gal-train built it
   (``pretrain.config.model_config``; the architecture variant of a ``model.init_from`` run included),
   written with ``model.hf.write_hf``, and the run's tokenizer (the file ``<data.path>/manifest.json``
   names: our tokenizer.model, or a released tokenizer.json as it is) is exported next to it, so that
   ``AutoTokenizer.from_pretrained(OUT_DIR)`` and ``OPTForCausalLM.from_pretrained(OUT_DIR)`` (or
   lm-eval-harness ``--model hf --model_args pretrained=OUT_DIR``) work.

A relative ``data.path`` (older runs) is found from any directory (:func:`find_data_path`). A missing
tokenizer is an error unless ``--no-tokenizer``. Every file is written with the user's umask
(``model.hf.with_umask_mode``: 0644 under umask 022), readable by colleagues on a shared cluster.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import pickle
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from pretrain.cli import fail, quiet_third_party
from pretrain.config import ConfigError
from pretrain.trainer import checkpoint

console = Console(stderr=True, soft_wrap=True)  # no hard wraps inside paths in logs


def find_checkpoint(run_dir: Path, tag: str | None) -> Path:
    """The tag directory to export: ``tag`` or the one ``RUN_DIR/checkpoints/latest`` names."""
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    ckpt_dir = run_dir / "checkpoints"
    if tag is None:
        tag = checkpoint.latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        if tag is None:
            raise ConfigError(f"no complete checkpoint in {ckpt_dir} (no '{checkpoint.LATEST}' file)")
    elif not (ckpt_dir / tag).is_dir():
        found = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir()) if ckpt_dir.is_dir() else []
        raise ConfigError(f"checkpoint {ckpt_dir / tag} does not exist; found: {', '.join(found) or 'none'}")
    return ckpt_dir / tag


def consolidate(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full (all DP and TP ranks merged) fp32 state dict of a gal-train checkpoint."""
    from model.hf import merge_tp_state_dicts

    layout = checkpoint.read_layout(tag_dir.parent, tag_dir.name)
    try:
        per_tp_rank = [_tp_rank_state(tag_dir, tp_rank) for tp_rank in range(layout["tp_size"])]
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{tag_dir}: a checkpoint file holds pickled objects beyond tensors and DeepSpeed's "
                          f"own types; refused (weights-only loading): {str(e).splitlines()[0]}") from None
    return merge_tp_state_dicts(per_tp_rank)


def _tp_rank_state(tag_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """One tensor-parallel rank's fp32 weights, its data-parallel ZeRO partitions merged."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    files = sorted(tag_dir.glob(f"*mp_rank_{tp_rank:02d}_*.pt"))
    if not files:
        raise ConfigError(f"{tag_dir} has no files of tensor-parallel rank {tp_rank} (*mp_rank_{tp_rank:02d}_*.pt)")
    if not any(f.name.endswith("_optim_states.pt") for f in files):  # ZeRO-0: full weights in the model file
        with checkpoint.weights_only_loading():
            state = torch.load(tag_dir / f"mp_rank_{tp_rank:02d}_model_states.pt", map_location="cpu")["module"]
    else:
        with tempfile.TemporaryDirectory(prefix="gal-export-") as tmp:
            (Path(tmp) / tag_dir.name).mkdir()
            for f in files:
                (Path(tmp) / tag_dir.name / f.name).symlink_to(f.resolve())
            # its chatter to stdout (tqdm bars stay on stderr); its torch.load(weights_only=False) made safe
            with contextlib.redirect_stdout(io.StringIO()), checkpoint.weights_only_loading():
                state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag_dir.name)
    return {k: v.float() for k, v in state.items() if v is not None and not k.endswith("_extra_state")}


def load_run_config(run_dir: Path):
    """The run's TrainConfig (its model and data sections) from RUN_DIR/config.yaml."""
    from omegaconf import OmegaConf

    from pretrain.config import TrainConfig, typed

    path = run_dir / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{path} is missing: {run_dir} is not a gal-train run directory")
    saved = OmegaConf.load(path)
    sections = {k: saved[k] for k in ("model", "data") if k in saved}
    return typed(OmegaConf.merge(OmegaConf.structured(TrainConfig), sections, {"run_dir": str(run_dir)}))


def export(run_dir: str | Path, out_dir: str | Path, tag: str | None = None,
           tokenizer: str | Path | None = None, overwrite: bool = False, no_tokenizer: bool = False) -> Path:
    """Write the HF folder of checkpoint ``tag`` (default: the latest) of ``run_dir``; returns out_dir.

    Every input is checked before the checkpoint is consolidated and anything is written: the shards
    (``data.path``, for the vocabulary and the tokenizer they name) and the tokenizer must be found,
    unless ``tokenizer`` names one or ``no_tokenizer`` asks for the model alone."""
    from model.hf import with_umask_mode, write_hf
    from pretrain.config import model_config
    from pretrain.data.shards import read_manifest

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    tag_dir = find_checkpoint(run_dir, tag)
    cfg = load_run_config(run_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir} exists and is not empty (pass --overwrite to write into it)")
    data_path = find_data_path(cfg.data.path, run_dir, required=not (tokenizer or no_tokenizer))
    manifest = read_manifest(data_path) if data_path is not None else None
    tok_file, tok = (None, None) if no_tokenizer else run_tokenizer(tokenizer, data_path, manifest)
    layout = checkpoint.read_layout(tag_dir.parent, tag_dir.name)
    console.print(f"[bold]gal-export[/] {tag_dir}: ZeRO-{layout['zero_stage']}, TP {layout['tp_size']} × "
                  f"DP {layout['dp_size']}")

    with console.status("consolidating the checkpoint to fp32 (DeepSpeed zero_to_fp32) ..."):
        full = consolidate(tag_dir)
    if manifest is None and cfg.model.vocab_size is None:
        console.print("[yellow]warning:[/] no shards: the vocabulary size is read from the weights")
    model_cfg = model_config(cfg, manifest or {"vocab_size": full["wte.weight"].shape[0]})
    want = (model_cfg.vocab_size, model_cfg.d_model)
    if tuple(full["wte.weight"].shape) != want:
        raise ConfigError(f"{tag_dir}: token embedding of shape {tuple(full['wte.weight'].shape)}, but "
                          f"{run_dir / 'config.yaml'} (model.size={cfg.model.size}) gives {want}")
    if tok is not None and tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer {tok_file} has {tok.vocab_size} tokens, more than the model's "
                          f"{model_cfg.vocab_size}")

    with console.status(f"writing the Hugging Face OPT folder to {out_dir} ..."):
        write_hf(full, model_cfg, out_dir)  # each file with the user's umask
    console.print(f"model: {sum(t.numel() for t in full.values()):,} parameters, {model_cfg.n_layers} layers, "
                  f"d_model {model_cfg.d_model}, vocab {model_cfg.vocab_size:,} → {out_dir}")
    if tok is None:
        console.print(f"tokenizer: none (--no-tokenizer): {out_dir} has the model only")
        return out_dir
    before = _file_stats(out_dir)
    tok.export_hf(out_dir)
    with_umask_mode(*[p for p, st in _file_stats(out_dir).items() if before.get(p) != st])
    console.print(f"tokenizer: {tok_file} ({tok.vocab_size:,} tokens) → {out_dir}")
    return out_dir


def _file_stats(folder: Path) -> dict[Path, tuple]:
    """Each file's (inode, size, mtime): compared before and after a writer, the files it created or rewrote."""
    stats = {}
    for path in folder.iterdir():
        if path.is_file():
            st = path.stat()
            stats[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return stats


def find_data_path(data_path: str, run_dir: Path, required: bool) -> Path | None:
    """The run's shards (``data.path`` of its config.yaml), found from wherever gal-export runs.

    A relative ``data.path`` (runs before gal-train recorded it absolute) is relative to the directory
    gal-train ran from: the one Hydra recorded (RUN_DIR/.hydra/hydra.yaml, hydra.runtime.cwd), else the
    current directory, else one of the run directory's ancestors (runs/NAME inside the project). The
    first that holds the shards' manifest.json wins, and the output says which. None when not found
    and not ``required`` (the tokenizer comes from --tokenizer, or none is wanted)."""
    from pretrain.data.shards import MANIFEST

    path = Path(data_path).expanduser()
    if path.is_absolute():
        candidates = [(path, "")]
    else:
        launched = _launch_dir(run_dir)
        bases = ([(launched, f"the directory gal-train ran from, {run_dir / '.hydra' / 'hydra.yaml'}")] if launched
                 else []) + [(Path.cwd(), "the current directory")]
        bases += [(a, "an ancestor of the run directory") for a in run_dir.resolve().parents]
        candidates = [(base / path, f" (relative in config.yaml: resolved against {how})") for base, how in bases]
    for candidate, how in candidates:
        if (candidate / MANIFEST).is_file():
            console.print(f"data.path: {candidate}{how}")
            return candidate
    tried = ", ".join(dict.fromkeys(str(c) for c, _ in candidates))
    message = f"data.path={data_path} (from {run_dir / 'config.yaml'}): no shards ({MANIFEST}) at {tried}"
    if required:
        raise ConfigError(f"{message}; run gal-export where gal-train ran, or pass --tokenizer PATH, or "
                          "--no-tokenizer to export the model alone")
    console.print(f"[yellow]warning:[/] {message}")
    return None


def _launch_dir(run_dir: Path) -> Path | None:
    """The directory gal-train ran from, as Hydra recorded it in RUN_DIR/.hydra/hydra.yaml (None if not)."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "hydra.yaml"
    try:
        cwd = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.cwd", throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 (absent or unreadable: not recorded)
        return None
    return Path(cwd) if isinstance(cwd, str) and Path(cwd).is_absolute() else None


def run_tokenizer(tokenizer: str | Path | None, data_path: Path | None, manifest: dict | None):
    """(path, tokenizer) of ``--tokenizer`` or of the file the shards' manifest names: ours (tokenizer.model)
    or a released one (tokenizer.json). A missing one is an error: an HF folder without its tokenizer
    is a trap for whoever loads it later."""
    from pretrain.tokenizer import load_tokenizer

    path = Path(tokenizer) if tokenizer else data_path / (manifest or {}).get("tokenizer", {}).get(
        "model", "tokenizer/tokenizer.model")
    if not path.exists():
        raise ConfigError(f"no tokenizer at {path}: pass --tokenizer PATH, or --no-tokenizer to export the "
                          "model alone")
    return path, load_tokenizer(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="gal-export", description="Export a gal-train checkpoint (any ZeRO stage, any TP size) as a "
        "Hugging Face OPTForCausalLM folder with the run's tokenizer.")
    parser.add_argument("run_dir", help="the gal-train run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("out_dir", help="the Hugging Face folder to write")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step00000042 (default: the latest complete one)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tokenizer", help="tokenizer.model, tokenizer.json or their directory (default: the one "
                       "the run's shards name in <data.path>/manifest.json)")
    which.add_argument("--no-tokenizer", action="store_true", help="export the model alone (without it a missing "
                       "tokenizer is an error)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    args = parser.parse_args(argv)
    quiet_third_party()
    try:
        export(args.run_dir, args.out_dir, tag=args.tag, tokenizer=args.tokenizer, overwrite=args.overwrite,
               no_tokenizer=args.no_tokenizer)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        fail("gal-export", str(e))


if __name__ == "__main__":
    main()
