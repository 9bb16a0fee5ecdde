"""One trainer per run directory (pretrain/trainer/rundir.py): refusal, stale locks taken over."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pretrain.config import ConfigError
from pretrain.trainer.rundir import LOCK, STALE_AFTER_S, RunDirLock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run_dir, age_s: float = 0.0, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "1", "slurm_job_id": None, **holder}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_second_trainer_is_refused_with_the_holder_named(tmp_path):
    first = RunDirLock(tmp_path / "run").acquire()
    holder = json.loads((tmp_path / "run" / LOCK).read_text())
    assert holder["pid"] == os.getpid() and holder["started"]
    with pytest.raises(ConfigError, match=rf"run_dir=.*run is in use by another gal-train \(host .*, pid {os.getpid()}, "
                                          r"lock refreshed 0 s ago\): use another run_dir"):
        RunDirLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / LOCK).exists()
    RunDirLock(tmp_path / "run").acquire().release()  # free again


def test_stale_locks_are_taken_over(tmp_path, monkeypatch):
    import socket

    here = socket.gethostname()
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cases = {
        "dead pid here": dict(host=here, pid=dead_pid(), started="123"),
        "pid reused here": dict(host=here, pid=os.getppid(), started="not its start time"),
        "silent elsewhere": dict(age_s=STALE_AFTER_S + 60),
        "unreadable": None,
    }
    for name, holder in cases.items():
        run = tmp_path / name.replace(" ", "_")
        if holder is None:
            run.mkdir()
            (run / LOCK).write_text("{trunc")
        else:
            write_lock(run, **holder)
        lock = RunDirLock(run).acquire()
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid(), name
        lock.release()


def test_a_live_lock_elsewhere_is_respected_unless_it_is_our_own_requeued_job(tmp_path, monkeypatch):
    write_lock(tmp_path / "a", slurm_job_id="77")
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(ConfigError, match=r"host elsewhere, pid 1, Slurm job 77"):
        RunDirLock(tmp_path / "a").acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued: its earlier incarnation has ended
    RunDirLock(tmp_path / "a").acquire().release()
