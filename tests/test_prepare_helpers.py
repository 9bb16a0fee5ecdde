"""Helpers for the gal-prepare tests: compose the real Hydra config, run the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pretrain.prepare  # noqa: F401  (registers the config schema)
from pretrain.data.config import PrepareConf

REPO = Path(__file__).resolve().parents[1]


def make_cfg(*overrides: str) -> PrepareConf:
    """conf/prepare.yaml with command-line style overrides, as gal-prepare would see it."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("prepare", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pretrain.prepare", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"gal-prepare {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def subset(src: Path, dst: Path, lines: int) -> Path:
    """The first `lines` lines of a JSONL file."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        for _, line in zip(range(lines), f):
            out.write(line)
    return dst


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n")
    return path
