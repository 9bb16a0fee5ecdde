"""The random-kill drill: per parallel layout, SIGKILL the whole job (torchrun and every rank) at random
moments, resume each time with ``resume=auto``, and require the uninterrupted run's losses and gradient
norms, step for step and bit for bit.

Ten kills a layout take about 20 minutes on 2 cores, so the drill is not part of ``make test`` (which
kills each layout once, at a fixed step: tests/test_train.py). Run it with ``make drill`` (10 kills a
layout), or ``pytest tests/faults/test_kill_drill.py --kill-drill=N``; ``--kill-drill-report=FILE``
writes every kill as a JSON line. Results: docs/reliability.md.

A kill takes the whole process tree at once (torchrun starts each rank in a session of its own, so a
process-group kill would leave the ranks running), as losing the node or Slurm's cgroup kill would.
A kill point is drawn as a step s (0 = during start-up) and a delay: the job is killed that delay after
this attempt logged step s (after launch, for s = 0). The delay is uniform over two steps of the
uninterrupted run (over its start-up for s = 0), so kills land in the forward and backward passes, the optimizer step, validation, a
checkpoint's write and the moment between its shards and ``latest``.
"""
from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, events, steps, synthetic_shards, train, train_command, train_env
from pretrain.analysis.records import read_metrics

pytestmark = [pytest.mark.trainer, pytest.mark.multirank, pytest.mark.slow]

SEQ = 32
STEPS = 40  # 4 epochs of 10 steps (helpers.TRAIN_COMMON: 128 tokens a step)
ARGS = [f"trainer.max_tokens={STEPS * 128}", "checkpoint.interval_tokens=256", "logger.wandb=false"]
LAYOUTS = {
    "zero1": (2, ["deepspeed=zero1"]),
    "zero2": (2, ["deepspeed=zero2"]),
    "zero3": (2, ["deepspeed=zero3"]),
    "tp2_dp2": (4, ["deepspeed=zero1", "trainer.tensor_parallel=2"]),
}


@pytest.fixture(scope="module")
def kills(request) -> int:
    n = request.config.getoption("--kill-drill")
    if not n:
        pytest.skip("the random-kill drill runs with `make drill` (10 kills a layout, ~20 min on 2 cores)")
    return n


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("shards"), SEQ, 40, samples_per_shard=16, pad_last=5)


def attempt_rows(run_dir: Path) -> list[dict]:
    """The rows this attempt wrote: those after the last ``start`` event (earlier rows past the checkpoint
    are dropped when the attempt starts)."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
    return rows[starts[-1] + 1:] if starts else []


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it, and wait until all are gone."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=60)
    proc.wait(timeout=60)
    proc.stderr.close()


def launch(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, n_starts: int, timeout: float = 600) -> None:
    """Until the attempt started after ``n_starts`` earlier ones has logged ``step``."""
    t0 = time.time()
    while not (len(events(run_dir, "start")) > n_starts
               and any(r.get("step", 0) >= step and "event" not in r for r in attempt_rows(run_dir))):
        if proc.poll() is not None:
            pytest.fail(f"the job ended ({proc.returncode}) before step {step}:\n{proc.stderr.read()[-4000:]}")
        if time.time() - t0 > timeout:
            pytest.fail(f"step {step} not reached in {timeout} s")
        time.sleep(0.01)


def kill_at(cmd: list[str], run_dir: Path, step: int, delay: float) -> dict:
    """Start the job; kill it ``delay`` s after this attempt logs ``step`` (after launch for step 0).
    Returns what the kill left: where the attempt resumed from, its last row, ``latest``, incomplete tags."""
    n_starts = len(events(run_dir, "start"))
    proc = launch(cmd)
    try:
        if step > 0:
            wait_for_step(proc, run_dir, step, n_starts)
        time.sleep(delay)
        finished = proc.poll() is not None
    finally:
        kill_tree(proc)
    ckpt = run_dir / "checkpoints"
    tags = sorted(p.name for p in ckpt.glob("step*")) if ckpt.is_dir() else []
    started = events(run_dir, "start")[n_starts:]
    rows = attempt_rows(run_dir) if started else []
    return {"kill_step": step, "delay_s": round(delay, 3), "finished_first": finished,
            "resumed_from": started[0]["step"] if started else None,
            "last_step": max((r["step"] for r in rows if "event" not in r), default=None),
            "last_row": rows[-1].get("event", "step") if rows else None,
            "latest": (ckpt / "latest").read_text().strip() if (ckpt / "latest").exists() else None,
            "incomplete": [t for t in tags if not (ckpt / t / "gal_complete.json").exists()]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_random_kills_then_resume_give_the_uninterrupted_run_bit_for_bit(layout, kills, shards, tmp_path, request):
    nproc, extra = LAYOUTS[layout]
    straight = tmp_path / "straight"
    t0 = time.time()
    proc = launch(train_command(nproc, straight, shards, *extra, *ARGS))
    wait_for_step(proc, straight, 1, 0)
    t1 = time.time()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    startup, per_step = t1 - t0, (time.time() - t1) / (STEPS - 1)
    want = steps(straight)
    assert [r["step"] for r in want] == list(range(1, STEPS + 1))

    rng = random.Random(f"{layout}-{kills}")
    points = sorted(rng.sample(range(0, STEPS - 2), kills))  # 0: during start-up
    run = tmp_path / "killed"
    cmd = train_command(nproc, run, shards, *extra, *ARGS)
    report = []
    for i, point in enumerate(points):
        delay = rng.uniform(0, startup if point == 0 else 2 * per_step)
        report.append({"layout": layout, "kill": i + 1, **kill_at(cmd, run, point, delay)})
        print(json.dumps(report[-1]))
    train(nproc, run, shards, *extra, *ARGS)  # the last resume runs to the end

    got = steps(run)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in want]  # exact
    assert events(run, "start")[-1]["resumed"] is True
    assert not [t for t in (run / "checkpoints").glob("step*") if not (t / "gal_complete.json").exists()]

    if path := request.config.getoption("--kill-drill-report"):
        with open(path, "a") as f:
            f.writelines(json.dumps({**row, "bit_identical": True}) + "\n" for row in report)
