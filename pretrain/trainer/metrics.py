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
import uuid
from pathlib import Path

import torch.distributed as dist
from rich.console import Console

from model import parallel
from pretrain.analysis.records import read_metrics


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
            self.wandb_run.log(_numbers(row))

    def event(self, name: str, *, to_wandb: bool = False, **fields) -> None:
        """A marker (start, epoch_end, checkpoint, ...): metrics.jsonl and the console; with ``to_wandb``
        also wandb (``<name>/<field>`` numbers in the history, and the event in the run summary)."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"event": name, **fields}) + "\n")
        if to_wandb and self.wandb_run is not None:
            self.wandb_run.log({"tokens_seen": fields.get("tokens_seen"), **_numbers(fields, f"{name}/")})
            self.wandb_run.summary[f"{name}/last"] = fields
        if self.console is not None:
            self.console.print(f"[bold]{name}[/bold] " + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))

    def validation(self, *, step: int, tokens_seen: int, epoch: float, repeat: int, reason: str, seconds: float,
                   losses: dict, tokens: dict, probes: dict | None = None) -> None:
        """A validation round: one row in metrics.jsonl; ``valid/<set>/loss`` series in wandb, and with
        the chemistry probes (pretrain/evaluation/probes.py) a ``probes`` entry / ``probe/<name>`` series."""
        if not self.enabled:
            return
        row = {"event": "validation", "step": step, "tokens_seen": tokens_seen, "epoch": epoch, "repeat": repeat,
               "reason": reason, "validation_s": round(seconds, 3), "losses": losses, "tokens": tokens}
        if probes is not None:
            row["probes"] = probes
        self.file.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({"tokens_seen": tokens_seen, "epoch": epoch, "repeat": repeat, "validation_s": seconds,
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


def _numbers(row: dict, prefix: str = "") -> dict:
    """The numeric fields of a row, nested dicts flattened to ``key/sub`` (wandb charts numbers only)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[f"{prefix}{k}"] = v
    return out


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


class SampleLog:
    """Which samples (dataset indices, all ranks) each step trained on: audits "no repeat, no skip"
    (``data.record_sample_ids``). Rows of steps after ``resume_step`` are dropped at start."""

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
