"""Where numbers go: ``metrics.jsonl`` in the run directory, wandb, and the console.

``metrics.jsonl`` is the record of the run: one JSON object per line, either a training step
(``step``, ``tokens_seen``, ``epoch``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ...)
or an event (``{"event": "epoch_end", ...}``). On resume the rows written after the checkpoint are
dropped, so the file reads as if the run had never stopped.

wandb runs offline (its files under ``RUN_DIR/wandb``) unless ``WANDB_API_KEY`` is set; the run id is
kept in the run directory so a resumed run continues the same wandb run. ``tokens_seen`` is the x-axis.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

from rich.console import Console


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if n == len(path.read_text().splitlines()):
                    break  # a half-written last line of a killed run
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
    return rows


class Metrics:
    """Only the main rank writes; other ranks get a Metrics whose methods do nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool, config: dict, use_wandb: bool, project: str,
                 group: str | None, name: str | None, console: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.console = Console(stderr=False) if (console and enabled) else None
        self.wandb_run = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        self.file = open(self.path, "a", buffering=1)
        if use_wandb:
            self.wandb_run = _init_wandb(Path(run_dir), config, project, group, name)

    def _truncate_after(self, step: int) -> None:
        """Drop rows of steps after ``step`` (written by a run that stopped before its next checkpoint)."""
        rows = read_metrics(self.path)
        keep = [r for r in rows if r.get("step", 0) <= step]
        if len(keep) != len(rows):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None})

    def event(self, name: str, **fields) -> None:
        """A marker (start, epoch_end, checkpoint, ...): metrics.jsonl and the console, not wandb history."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"event": name, **fields}) + "\n")
        if self.console is not None:
            self.console.print(f"[bold]{name}[/bold] " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))

    def validation(self, *, step: int, tokens_seen: int, epoch: float, repeat: int, reason: str,
                   losses: dict, tokens: dict, probes: dict | None = None) -> None:
        """A validation round: one row in metrics.jsonl; ``valid/<set>/loss`` series in wandb, and with
        the chemistry probes (pretrain/probes.py) a ``probes`` entry / ``probe/<name>`` series."""
        if not self.enabled:
            return
        row = {"event": "validation", "step": step, "tokens_seen": tokens_seen, "epoch": epoch, "repeat": repeat,
               "reason": reason, "losses": losses, "tokens": tokens}
        if probes is not None:
            row["probes"] = probes
        self.file.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({"tokens_seen": tokens_seen, "epoch": epoch, "repeat": repeat,
                                **{f"valid/{k}/loss": v for k, v in losses.items() if v is not None},
                                **{f"probe/{k}": v for k, v in (probes or {}).items() if v is not None}})
        if self.console is not None:
            agg, seen = losses.get("aggregate"), losses.get("seen")
            self.console.print(f"[bold]validation[/bold] ({reason}) step={step} epoch={epoch:.2f} "
                               + (f"held-out={agg:.4f} " if agg is not None else "")
                               + (f"seen={seen:.4f}" if seen is not None else "")
                               + "".join(f" {k}={v:.3f}" for k, v in (probes or {}).items()
                                         if k in ("formula_exact_match", "smiles_validity") and v is not None))

    def print(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _init_wandb(run_dir: Path, config: dict, project: str, group: str | None, name: str | None):
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    run = wandb.init(project=project, group=group, name=name or run_dir.name, id=run_id, resume="allow",
                     dir=str(run_dir), mode=mode, config=config,
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
    run.define_metric("tokens_seen")
    run.define_metric("*", step_metric="tokens_seen")
    return run


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class StepTimer:
    """Tokens per second and model FLOPs utilisation over the steps since the last read."""

    def __init__(self, flops_per_token: float, peak_flops: float, devices: int):
        """``peak_flops`` of one device (GPU, or one process's share of the CPU); ``devices`` of them."""
        self.flops_per_token, self.peak_flops, self.devices = flops_per_token, peak_flops, devices
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> tuple[float, float]:
        now = time.perf_counter()
        tps = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return tps, tps * self.flops_per_token / (self.peak_flops * self.devices)


def is_tty() -> bool:
    return sys.stdout.isatty()


_DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                    "L40S": 362e12, "B200": 2250e12}


def peak_flops(device) -> float:
    """The denominator of MFU: a GPU's dense bf16 peak from its datasheet, or on the CPU the fp32
    matmul rate measured here (a 1024³ GEMM, best of 5), since CPUs have no single datasheet number."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in _DENSE_BF16_PEAK.items():
            if key in name:
                return flops
        return 989e12
    a = torch.full((1024, 1024), 0.5)  # no RNG draw: the run's random streams must not depend on this
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * 1024**3 / best
