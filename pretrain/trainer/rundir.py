"""One trainer per run directory: ``RUN_DIR/.gal-train.lock``, taken by the main rank before anything in
the directory is written.

The lock file holds its holder (host, pid, Slurm job id, start time) and is refreshed every
``HEARTBEAT_S`` seconds while the run lives. A second trainer is refused with a one-line error naming
the holder. A lock left by a dead process is taken over, which covers SIGKILL, OOM and a requeue on
another node:

* the same Slurm job id as ours: a requeued job's earlier incarnation, which Slurm has ended;
* same host: the holder's pid no longer runs (or runs something else: its start time differs);
* another host: the lock has not been refreshed for ``STALE_AFTER_S`` seconds.

Taking and taking over both go through an atomic create-or-rename, so two starters racing for a
stale lock cannot both win.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from pathlib import Path

from pretrain.config import ConfigError

LOCK = ".gal-train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "time": time.time()}


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict, age_s: float) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job and holder.get("pid") != os.getpid():
        return False
    if holder.get("host") != socket.gethostname():
        return age_s < STALE_AFTER_S
    started = _process_start(int(holder.get("pid", -1)))
    return started is not None and started == holder.get("started")


class RunDirLock:
    """Held by the main rank for the life of the run; :meth:`release` (or the process's death) ends it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = json.dumps(_me())
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over_if_stale(mine)
        else:
            with os.fdopen(fd, "w") as f:
                f.write(mine)
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        atexit.register(self.release)  # an error on the way out still frees the directory
        return self

    def _take_over_if_stale(self, mine: str) -> None:
        try:
            holder, age = json.loads(self.path.read_text()), time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            holder, age = {}, STALE_AFTER_S  # unreadable: a write cut short; treat as stale
        if holder and _alive(holder, age):
            job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
            raise ConfigError(
                f"run_dir={self.path.parent} is in use by another gal-train (host {holder.get('host')}, pid "
                f"{holder.get('pid')}{job}, lock refreshed {age:.0f} s ago): use another run_dir, or wait for it "
                f"to end; if that process is gone, remove {self.path}")
        tmp = self.path.with_name(f"{LOCK}.{os.getpid()}.tmp")
        tmp.write_text(mine)
        os.replace(tmp, self.path)  # the last writer wins; check that it is us
        if json.loads(self.path.read_text()).get("pid") != os.getpid():
            raise ConfigError(f"run_dir={self.path.parent}: another gal-train took over its stale lock just now")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
