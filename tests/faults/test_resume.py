"""Resuming from what a crash, a disk or an operator leaves behind: a lost ``latest``, a truncated or
corrupt checkpoint file, a changed ZeRO stage, seed or data seed. Real trainer, real DeepSpeed; one
finished run is copied for each case."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import events, steps, synthetic_shards, train

pytestmark = pytest.mark.trainer

ARGS = ["trainer.max_tokens=768", "checkpoint.interval_tokens=256", "checkpoint.keep_last=2", "logger.wandb=false"]
MODEL_FILE = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("shards"), 32, 40, samples_per_shard=16)


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """6 steps of 128 tokens, ZeRO-2, checkpoints at steps 2, 4, 6; keep_last=2 leaves 4 and 6."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(1, run, shards, *ARGS)
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000004", "step00000006"]
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def error_line(proc) -> str:
    """The one error line of a gal-train that failed with exit 2, and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("gal-train: error:")]
    return line


@pytest.mark.parametrize("damage", ["deleted", "emptied", "garbage", "missing tag"])
def test_a_lost_latest_resumes_from_the_newest_complete_checkpoint_and_deletes_none(damage, run, shards):
    ckpts = run / "checkpoints"
    latest = ckpts / "latest"
    {"deleted": latest.unlink, "emptied": lambda: latest.write_text(""),
     "garbage": lambda: latest.write_bytes(b"\x00\xffnot a tag"),
     "missing tag": lambda: latest.write_text("step00000099")}[damage]()
    proc = train(1, run, shards, *ARGS[1:], "trainer.max_tokens=1024")
    warning = [x for x in proc.stderr.splitlines() if x.startswith("warning:") and "newest complete" in x]
    assert len(warning) == 1 and "step00000006" in warning[0]
    assert events(run, "start")[-1]["step"] == 6 and [r["step"] for r in steps(run)] == list(range(1, 9))
    # keep_last=2 of the run's own line: 6 (resumed from) and 8; nothing else was there to lose
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000006", "step00000008"]
    assert latest.read_text() == "step00000008"


def test_a_truncated_checkpoint_file_is_named_and_the_previous_checkpoint_taken_or_offered(run, shards):
    newest = run / "checkpoints" / "step00000006"
    size = (newest / MODEL_FILE).stat().st_size
    with open(newest / MODEL_FILE, "r+b") as f:
        f.truncate(size // 2)
    # named: resume=<that checkpoint> refuses, offering the previous complete one
    proc = train(1, run, shards, *ARGS, f"resume={newest}", expect=2)
    line = error_line(proc)
    assert f"{newest / MODEL_FILE} is {size // 2} bytes, {size} when written" in line
    assert f"resume={run / 'checkpoints' / 'step00000004'}" in line
    # resume=auto takes the previous complete checkpoint itself, and says why
    proc = train(1, run, shards, *ARGS)
    (warning,) = [x for x in proc.stderr.splitlines() if x.startswith("warning:")]
    assert f"{MODEL_FILE} is {size // 2} bytes" in warning and "step00000004" in warning
    assert events(run, "start")[-1]["step"] == 4 and [r["step"] for r in steps(run)] == list(range(1, 7))


def test_a_corrupt_checkpoint_file_of_the_right_size_is_named(run, shards):
    newest = run / "checkpoints" / "step00000006"
    path = newest / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-200:] = bytes(200)  # the zip's central directory, zeroed: the size is unchanged
    path.write_bytes(bytes(data))
    proc = train(1, run, shards, *ARGS, "trainer.max_tokens=1024", expect=2)
    line = error_line(proc)
    assert f"{path}: unreadable (" in line and f"resume={run / 'checkpoints' / 'step00000004'}" in line
    assert events(run, "start")[-1]["step"] == 0  # the run before: nothing was loaded or logged


def test_another_zero_stage_or_data_seed_is_refused_and_another_seed_warned(run, shards):
    line = error_line(train(1, run, shards, *ARGS, "trainer.max_tokens=1024", "deepspeed=zero3", expect=2))
    assert "deepspeed.zero_stage=3" in line and "ZeRO stage 2" in line and "deepspeed=zero2" in line
    line = error_line(train(1, run, shards, *ARGS, "trainer.max_tokens=1024", "data.seed=7", expect=2))
    assert "step00000006" in line and "data.seed=7, but the checkpoint used data.seed=1234" in line
    assert events(run, "start")[-1]["step"] == 0
    proc = train(1, run, shards, *ARGS, "trainer.max_tokens=1024", "seed=7")
    (warning,) = [x for x in proc.stderr.splitlines() if x.startswith("warning:")]
    assert "seed=7" in warning and "trained with seed=1234" in warning
    assert events(run, "start")[-1]["step"] == 6
