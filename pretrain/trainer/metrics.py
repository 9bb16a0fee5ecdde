"""Where numbers go: ``metrics.jsonl`` in the run directory, wandb, and the console.

``metrics.jsonl`` is the record of the run: one JSON object per line, either a training step
(``step``, ``tokens_seen``, ``epoch``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ...)
or an event (``{"event": "epoch_end", ...}``). On resume the rows written after the checkpoint are
dropped, so the file reads as if the run had never stopped.

wandb (``logger.*``, conf/logger/wandb.yaml) mirrors it, with ``tokens_seen`` as the x-axis:

* **Mode** (:func:`wandb_mode`): ``WANDB_MODE`` if set, never overridden; else ``logger.mode``, whose ``auto``
  is online when a key is present (``WANDB_API_KEY``, or a ``wandb login`` that wandb itself finds) and
  offline otherwise (files under ``RUN_DIR/wandb``, ``wandb sync`` later).
* **Never fatal** (:func:`init_wandb`): an online start that fails or passes ``logger.init_timeout_s``
  warns on one line and goes offline; if even that fails the run goes on without wandb. metrics.jsonl is
  written either way.
* **Events** (:meth:`Metrics.event`): each is a history row with ``event/<name>`` = 1 at its ``tokens_seen``
  (a marker chartable against the losses), its last occurrence in the summary (``<name>/last``), and at the
  end the whole list from metrics.jsonl as an ``events`` table (name, step, tokens_seen, epoch, details).
  ``wandb.alert`` is not used: it needs a server and says nothing offline.
* The run id is kept in the run directory, so a resumed run continues the same wandb run.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
from rich.console import Console

from model import parallel
from pretrain.analysis.records import read_metrics

if TYPE_CHECKING:
    from pretrain.config import LoggerConf


class Metrics:
    """Only the main rank writes; other ranks get a Metrics whose methods do nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool, config: dict, logger: LoggerConf, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.console = Console(stderr=False) if (logger.console and enabled) else None
        self.wandb_run = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        self.file = open(self.path, "a", buffering=1)
        if logger.wandb:
            self.wandb_run = init_wandb(Path(run_dir), config, logger)

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
        """A marker (start, epoch_end, checkpoint, preempted, ...): metrics.jsonl, the console, and wandb (an
        ``event/<name>`` row at its ``tokens_seen``, ``<name>/last`` in the summary, the ``events`` table at
        the end). ``to_wandb`` also charts its numeric fields as ``<name>/<field>`` series (a double-descent
        verdict's epoch, ...): for events whose numbers are worth a curve, not start's world size."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"event": name, **fields}) + "\n")
        if self.wandb_run is not None:
            at = {"tokens_seen": fields["tokens_seen"]} if fields.get("tokens_seen") is not None else {}
            self.wandb_run.log({**at, f"event/{name}": 1, **(_numbers(fields, f"{name}/") if to_wandb else {})})
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
            self.wandb_run.log({"events": _events_table(read_metrics(self.path))})
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


def wandb_mode(setting: str) -> str:
    """The run's wandb mode, ``online``, ``offline`` or ``disabled``, from ``logger.mode`` (``setting``).

    ``WANDB_MODE``, when set, wins (a compute node without network sets it for every job); a different
    explicit ``logger.mode`` is then named in a warning. ``auto`` is online when wandb finds a key: the
    ``WANDB_API_KEY`` variable, or what ``wandb login`` saved (netrc, settings), asked of ``wandb.login`` itself
    without a prompt or a server check; else offline."""
    env = os.environ.get("WANDB_MODE")
    if env:
        mode = {"dryrun": "offline", "run": "online"}.get(env, env)
        if setting not in ("auto", mode):
            _warn(f"logger.mode={setting} ignored: WANDB_MODE={env} is set and wins (unset it to use logger.mode)")
        return mode
    if setting != "auto":
        return setting
    return "online" if os.environ.get("WANDB_API_KEY") or _wandb_login_found() else "offline"


def _wandb_login_found() -> bool:
    import wandb

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its "Loaded credentials ..." lines
            return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # noqa: BLE001 (a malformed netrc or settings file: no usable login)
        return False


def init_wandb(run_dir: Path, config: dict, logger: LoggerConf):
    """The wandb run, or None: a wandb that fails to start never stops training (module docstring)."""
    mode = wandb_mode(logger.mode)
    if mode == "disabled":
        return None
    import wandb

    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    before = set((run_dir / "wandb").glob("run-*"))
    try:  # pass no mode when WANDB_MODE is set: wandb reads it itself
        return _start_wandb(run_dir, config, logger, run_id, None if os.environ.get("WANDB_MODE") else mode,
                            logger.init_timeout_s)
    except Exception as e:  # noqa: BLE001 (wandb raises CommError, UsageError, AuthenticationError, timeouts, ...)
        error = _one_line(e)
    if mode != "online":
        _warn(f"wandb ({mode}) did not start ({error}): this run logs to metrics.jsonl only")
        return None
    _warn(f"wandb did not start online ({error}): logging offline (upload later: wandb sync "
          f"{run_dir / 'wandb'}/offline-run-*); logger.mode=offline skips the attempt")
    wandb.teardown()  # the failed attempt still holds the run id in wandb's service
    for folder in set((run_dir / "wandb").glob("run-*")) - before:  # the failed attempt's run folder, no data
        shutil.rmtree(folder, ignore_errors=True)
    # The run's id first (a resumed run stays one wandb run); a fresh one if wandb's service still holds that
    # id for the attempt that timed out ("run ID ... is in use", seen on a loaded machine). With wandb's own
    # timeout: logger.init_timeout_s bounds the wait for a server, not a local start.
    for offline_id in (run_id, uuid.uuid4().hex[:12]):
        try:
            run = _start_wandb(run_dir, config, logger, offline_id, "offline", init_timeout_s=None)
        except Exception as e:  # noqa: BLE001
            error = _one_line(e)
            continue
        id_file.write_text(offline_id)
        return run
    _warn(f"wandb did not start offline either ({error}): this run logs to metrics.jsonl only")
    return None


def _start_wandb(run_dir: Path, config: dict, logger: LoggerConf, run_id: str, mode: str | None,
                 init_timeout_s: float | None):
    import wandb

    timeout = {} if init_timeout_s is None else {"init_timeout": float(init_timeout_s)}
    run = wandb.init(project=logger.project, group=logger.group, name=logger.name or run_dir.name, id=run_id,
                     resume="allow", dir=str(run_dir), mode=mode, config=config,
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, **timeout))
    run.define_metric("tokens_seen")
    run.define_metric("*", step_metric="tokens_seen")
    return run


def _events_table(rows: list[dict]):
    """Every event of the run (resumed sessions included: metrics.jsonl is the record) as a wandb.Table;
    validation rounds are left out, they are the ``valid/...`` series."""
    import wandb

    columns = ["event", "step", "tokens_seen", "epoch", "details"]
    data = [[r["event"], r.get("step"), r.get("tokens_seen"), r.get("epoch"),
             json.dumps({k: v for k, v in r.items() if k not in columns})]
            for r in rows if "event" in r and r["event"] != "validation"]
    return wandb.Table(columns=columns, data=data)


def _one_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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
