"""Config errors are raised before the rendezvous: a 2-rank torchrun of gal-train with a batch that does
not split over its ranks fails on every rank with the same one-line message, quickly, and no rank ever
calls torch.distributed.init_process_group.

How the test sees inside the ranks: a ``sitecustomize`` module put first on the ranks' PYTHONPATH (Python
imports it at start-up, before any of our code) wraps ``torch.distributed.init_process_group`` to leave a
file behind when called, and makes each rank wait at exit until every rank has reached its exit (torchrun
SIGTERMs the other ranks as soon as one fails: without that wait the slower rank could be killed before
printing its message, and the test would race). It acts only in processes with RANK set (not the agent).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, free_port, synthetic_shards, train_command, train_env

pytestmark = pytest.mark.multirank  # the control below is one process, but it exists for the 2-rank test

HOOK = '''
import os
_dir = os.environ.get("GAL_TEST_HOOK_DIR")
if _dir and "RANK" in os.environ:
    import atexit
    import time

    import torch.distributed as _dist

    _rank, _world = os.environ["RANK"], int(os.environ["WORLD_SIZE"])
    _init_process_group = _dist.init_process_group

    def init_process_group(*args, **kwargs):
        open(os.path.join(_dir, "init_process_group." + _rank), "w").close()
        return _init_process_group(*args, **kwargs)

    _dist.init_process_group = init_process_group

    def _exit_together():
        open(os.path.join(_dir, "exit." + _rank), "w").close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                os.path.exists(os.path.join(_dir, "exit." + str(r))) for r in range(_world)):
            time.sleep(0.05)

    atexit.register(_exit_together)
'''

MESSAGE = ("gal-train: error: trainer.global_batch_tokens=128 gives 4 sequences of 32 tokens, not divisible by "
           "trainer.micro_batch_size=3 × 2 data-parallel ranks; e.g. trainer.global_batch_tokens=192")


def hooked_env(tmp_path: Path) -> tuple[dict, Path]:
    hook, marks = tmp_path / "hook", tmp_path / "marks"
    hook.mkdir()
    marks.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = train_env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(PYTHONPATH=f"{hook}{os.pathsep}{REPO}", GAL_TEST_HOOK_DIR=str(marks))
    return env, marks


def test_the_hook_sees_a_rendezvous(tmp_path):
    """The control: the production call (model.parallel.init_distributed, env://) leaves the mark."""
    env, marks = hooked_env(tmp_path)
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    code = "from model import parallel; parallel.init_distributed(1, backend='gloo'); parallel.destroy()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in marks.iterdir()) == ["exit.0", "init_process_group.0"]


@pytest.mark.trainer
def test_bad_batch_fails_on_every_rank_before_the_rendezvous(tmp_path):
    shards = synthetic_shards(tmp_path / "shards", seq_len=32, n_samples=64)
    env, marks = hooked_env(tmp_path)
    cmd = train_command(2, tmp_path / "run", shards, "trainer.micro_batch_size=3", "trainer.max_tokens=256",
                        "logger.wandb=false")
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    elapsed = time.monotonic() - start
    output = f"exit {proc.returncode}, {elapsed:.0f} s\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 1, output
    # both ranks ran to their exit, and neither joined a process group
    assert sorted(p.name for p in marks.iterdir()) == ["exit.0", "exit.1"], output
    # one line per rank, the same line, and no traceback of ours
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gal-train: error:")]
    assert errors == [MESSAGE, MESSAGE], output
    assert "ConfigError" not in proc.stderr, output
    # quickly: the time to start Python, import the trainer and read the shards' index (a rank waiting
    # for a rendezvous that never comes would sit out model.parallel's 30-minute timeout)
    assert elapsed < 120, output
