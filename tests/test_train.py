"""The training engine end to end: real DeepSpeed, real processes (torchrun over gloo), real signals.

The shards here are small synthetic ones written with the real ShardWriter (the data path has its
own tests), so that each run takes seconds and the assertions can be exact.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, events, steps, synthetic_shards, train, train_command, train_env, wandb_records
from pretrain.train import EXIT_LOSS_GUARD, EXIT_PREEMPTED

pytestmark = pytest.mark.trainer

SEQ = 32
N_SAMPLES = 40  # 4 samples (128 tokens) a step (helpers.TRAIN_COMMON): 10 steps an epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """40 synthetic samples; the last one ends in 5 pad tokens."""
    return synthetic_shards(tmp_path_factory.mktemp("shards"), SEQ, N_SAMPLES, samples_per_shard=16, pad_last=5)


def kill_when(proc: subprocess.Popen, run_dir: Path, step: int, sig=signal.SIGKILL, timeout=300) -> None:
    """Send ``sig`` to the whole process group once metrics.jsonl shows ``step``."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"run ended ({proc.returncode}) before step {step}: {proc.stderr.read()[-4000:]}")
        if any(r.get("step", 0) >= step for r in steps(run_dir)):
            os.killpg(proc.pid, sig)
            proc.wait(timeout=120)
            return
        time.sleep(0.05)
    pytest.fail(f"step {step} not reached in {timeout} s")


LAYOUTS = {
    "zero1": (2, ["deepspeed=zero1"]),
    "zero3": (2, ["deepspeed=zero3"]),
    "tp2_dp2_zero2": (4, ["deepspeed=zero2", "trainer.tensor_parallel=2"]),
    # ZeRO-2 in bf16, the default on a GPU and on this CPU (fp32 ZeRO-2: the mixture's SIGKILL test below, and
    # under TP above; all of them 10 kills each in `make drill`)
    "zero2_bf16": (2, ["deepspeed=zero2", "deepspeed.precision=bf16"]),
}


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigkill_mid_epoch_then_resume_gives_the_same_losses_bit_for_bit(layout, shards, tmp_path):
    nproc, extra = LAYOUTS[layout]
    # 8 steps: the epoch ends at step 10, so the kill and the resume fall mid-epoch
    args = [*extra, "trainer.max_tokens=1024", "checkpoint.interval_tokens=384", "logger.wandb=false"]
    train(nproc, tmp_path / "straight", shards, *args)
    want = [r["loss"] for r in steps(tmp_path / "straight")]
    assert len(want) == 8

    run = tmp_path / "killed"  # every rank SIGKILLs itself after step 5: steps 4-5 are lost work
    train(nproc, run, shards, *args, expect=1 if nproc > 1 else -signal.SIGKILL,
          extra_env={"GAL_FAULT_KILL": "step:5"})
    assert [r["step"] for r in steps(run)] == [1, 2, 3, 4, 5]
    assert (run / "checkpoints" / "latest").read_text() == "step00000003"
    train(nproc, run, shards, *args)  # resume=auto
    got = [r["loss"] for r in steps(run)]
    assert got == want  # exact float equality, every step
    assert events(run, "start")[-1]["resumed"] is True


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("precision, rel", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_resume_on_one_rank_from_two_consumes_every_sample_of_the_epoch_once(precision, rel, shards, tmp_path):
    run = tmp_path / "run"
    args = ["deepspeed=zero2", f"deepspeed.precision={precision}", "data.record_sample_ids=true", "logger.wandb=false",
            "model.dropout=0.0", "model.attention_dropout=0.0"]  # no dropout: its masks depend on the rank
    # 5 of the epoch's 10 steps on 2 ranks, a checkpoint after step 4
    train(2, run, shards, *args, "trainer.max_tokens=640", "checkpoint.interval_tokens=512")
    step5_on_two = steps(run)[4]["loss"]
    # the rest on 1 rank from step 4, via a universal checkpoint (DeepSpeed's ds_to_universal)
    train(1, run, shards, *args, "trainer.max_epochs=1", f"resume={run / 'checkpoints' / 'step00000004'}")
    assert (run / "checkpoints" / "universal" / "step00000004").is_dir()
    rows = [json.loads(x) for x in (run / "sample_ids.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    ids = [i for r in rows for i in r["ids"]]
    assert sorted(ids) == list(range(N_SAMPLES))  # no repeat, no skip
    assert [r["epoch"] for r in steps(run)][-1] == 1.0
    start = events(run, "start")
    assert [s["world_size"] for s in start] == [2, 1] and [s["grad_accum"] for s in start] == [2, 4]
    assert [s["precision"] for s in start] == [precision] * 2
    # step 5 on 1 rank is step 5 on 2: the same samples on the weights the conversion carried over (in bf16:
    # DeepSpeed's fp32 master weights, recast); only the summation order differs
    assert steps(run)[4]["loss"] == pytest.approx(step5_on_two, rel=rel)


MIXTURE = ["+data.mixture={big:0.8,small:0.2}", "data.repeat.source=big", "data.repeat.samples=3",
           "data.repeat.fraction=0.25"]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("two_sources"), SEQ, {"big": 40, "small": 12}, samples_per_shard=16)


def planned_ids(shards: Path, steps: int) -> list[list[int]]:
    """The samples of each global batch of MIXTURE, from the loader in this process (the plan)."""
    from pretrain.data.loader import EpochLoader, plan_streams
    from pretrain.data.shards import TrainSplit

    train = TrainSplit(shards)
    streams = plan_streams({s: train.ids(s) for s in train.sources}, mixture={"big": 0.8, "small": 0.2},
                           repeat_source="big", repeat_samples=3, repeat_fraction=0.25, seed=1234)
    loader = EpochLoader(train, streams, micro_batch_size=4, global_batch_size=4, prefetch=0)
    return [sorted(loader.next_global_batch()[0].sample_ids.tolist()) for _ in range(steps)]


@pytest.mark.slow
@pytest.mark.multirank
def test_a_mixture_with_a_repeated_subset_resumes_bit_for_bit_and_on_one_rank_consumes_the_plan(two_sources, tmp_path):
    args = ["deepspeed=zero2", *MIXTURE, "trainer.max_tokens=1536", "checkpoint.interval_tokens=384",
            "data.record_sample_ids=true", "logger.wandb=false"]
    train(2, tmp_path / "straight", two_sources, *args)
    want = steps(tmp_path / "straight")
    assert len(want) == 12
    run = tmp_path / "killed"  # SIGKILL after step 5; the resume starts from the step-3 checkpoint
    train(2, run, two_sources, *args, expect=1, extra_env={"GAL_FAULT_KILL": "step:5"})
    train(2, run, two_sources, *args)
    got = steps(run)
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # exact float equality
    assert [r["source_tokens"] for r in got] == [r["source_tokens"] for r in want]
    # accounting: 12 steps × 4 samples × 32 tokens; shares 0.6 big + 0.25 repeated (from big), 0.15 small
    last = want[-1]
    assert last["source_tokens"] == {"big": 41 * SEQ, "small": 7 * SEQ}
    assert last["repeated_passes"] == pytest.approx(12 / 3) and last["source_epochs"]["small"] == pytest.approx(7 / 12)

    # 2 → 1 ranks half-way: every step trains on exactly the planned samples
    moved = tmp_path / "moved"
    train(2, moved, two_sources, *args[:-3], "trainer.max_tokens=768", "data.record_sample_ids=true", "logger.wandb=false")
    train(1, moved, two_sources, *args)
    rows = [json.loads(x) for x in (moved / "sample_ids.jsonl").read_text().splitlines()]
    assert [sorted(r["ids"]) for r in rows] == planned_ids(two_sources, 12)
    assert [s["world_size"] for s in events(moved, "start")] == [2, 1]


def test_throughput_counts_the_training_steps_alone(shards, tmp_path):
    run = tmp_path / "run"  # a validation round about as long as a step, and a checkpoint, every 4 steps
    train(1, run, shards, "trainer.max_tokens=5120", "validation.interval_tokens=512", "validation.max_cost=1",
          "validation.seen_samples=40", "validation.after_boundary_points=0", "checkpoint.interval_tokens=512",
          "logger.wandb=false")
    rows = {r["step"]: r for r in steps(run)}
    after = {s + 1 for s in {v["step"] for v in events(run, "validation")}} & set(rows)
    # each step after a round against its two neighbours (not after a round themselves), as a ratio
    ratios = [rows[s]["tokens_per_s"] / np.mean([rows[s - 1]["tokens_per_s"], rows[s + 1]["tokens_per_s"]])
              for s in sorted(after) if s - 1 in rows and s + 1 in rows and not {s - 1, s + 1} & after]
    assert len(ratios) >= 5
    assert float(np.median(ratios)) == pytest.approx(1.0, abs=0.15)
    assert all(rows[s]["time/validation_s"] > 0 for s in after)
    assert all("time/validation_s" not in r for s, r in rows.items() if s not in after)
    assert all(c["seconds"] > 0 for c in events(run, "checkpoint"))


def test_sigusr1_checkpoints_and_exits_with_the_preemption_code(shards, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_command(1, run, shards, "trainer.max_epochs=50", "logger.wandb=false"), cwd=REPO,
                            env=train_env(), text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    kill_when(proc, run, step=3, sig=signal.SIGUSR1)
    assert proc.returncode == EXIT_PREEMPTED
    last = steps(run)[-1]["step"]
    assert (run / "checkpoints" / "latest").read_text() == f"step{last:08d}"
    assert events(run, "preempted")[0]["step"] == last


def test_a_second_trainer_on_the_same_run_directory_is_refused_and_a_killed_ones_lock_is_taken_over(shards, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_command(1, run, shards, "trainer.max_epochs=50", "logger.wandb=false",
                                          "checkpoint.interval_tokens=256"),
                            cwd=REPO, env=train_env(), text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        while not any(r.get("step", 0) >= 3 for r in steps(run)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        second = train(1, run, shards, "trainer.max_epochs=50", "logger.wandb=false", expect=2)
        (line,) = [x for x in second.stderr.splitlines() if x.startswith("gal-train: error:")]
        assert f"is in use by another gal-train (host {os.uname().nodename}, pid " in line
        assert "Traceback" not in second.stderr
    finally:
        kill_when(proc, run, step=4)  # SIGKILL: the lock stays behind, its pid dead
    before = [r["step"] for r in steps(run)]
    assert before == list(range(1, len(before) + 1))  # nothing logged twice
    assert (run / ".gal-train.lock").exists()
    last = before[-1]
    train(1, run, shards, f"trainer.max_tokens={(last + 2) * 128}", "logger.wandb=false", "checkpoint.interval_tokens=256")
    assert events(run, "start")[-1]["resumed"] is True and not (run / ".gal-train.lock").exists()
    assert [r["step"] for r in steps(run)] == list(range(1, last + 3))


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(shards, tmp_path):
    run = tmp_path / "run"
    args = ["trainer.max_tokens=768", "checkpoint.interval_tokens=256", "logger.wandb=false"]
    proc = train(1, run, shards, *args, expect=-signal.SIGKILL, extra_env={"GAL_FAULT_KILL": "checkpoint:4"})
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    assert (run / "checkpoints" / "step00000004").is_dir()  # written, never committed
    train(1, run, shards, *args)
    assert events(run, "start")[-1]["step"] == 2
    assert [r["step"] for r in steps(run)] == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / "latest").read_text() == "step00000006"


def test_nan_loss_skips_the_update_and_k_in_a_row_stop_cleanly(shards, tmp_path):
    run = tmp_path / "one"
    train(1, run, shards, "trainer.max_tokens=640", "trainer.inject_nan_at_steps=[3]", "logger.wandb=false")
    rows = steps(run)
    assert rows[2]["skipped"] == "non-finite loss" and rows[2]["skipped_steps"] == 1
    assert rows[2]["loss"] is None and rows[2]["grad_norm"] is None
    assert rows[-1]["skipped_steps"] == 1 and all(r["loss"] is not None for r in rows[3:])

    run = tmp_path / "many"
    train(1, run, shards, "trainer.max_tokens=1280", "trainer.inject_nan_at_steps=[3,4,5]",
          "trainer.max_consecutive_skips=3", "logger.wandb=false", expect=EXIT_LOSS_GUARD)
    stopped = events(run, "stopped")
    assert stopped and "3 bad steps in a row" in stopped[0]["reason"]
    assert steps(run)[-1]["step"] == 5
    assert (run / "checkpoints" / "latest").read_text() == "step00000005"


def test_a_nan_loss_in_bf16_skips_the_update_too(shards, tmp_path):
    run = tmp_path / "bf16"  # DeepSpeed's bf16 mode (the GPU's precision path) on the CPU
    train(1, run, shards, "trainer.max_tokens=640", "trainer.inject_nan_at_steps=[3]", "deepspeed.precision=bf16",
          "logger.wandb=false")
    rows = steps(run)
    assert rows[2]["skipped"] == "non-finite loss" and rows[2]["loss"] is None
    assert rows[-1]["skipped_steps"] == 1 and all(r["loss"] is not None for r in rows[3:])
    assert events(run, "start")[0]["precision"] == "bf16"


@pytest.mark.slow
@pytest.mark.multirank
def test_bf16_trains_alike_under_zero1_zero3_and_tensor_parallel(shards, tmp_path):
    """DeepSpeed's bf16 mode on the CPU under the other layouts: one model, one batch order, so the same
    losses up to bf16's rounding (the reductions and partitions differ; no dropout)."""
    layouts = {"zero1": ["deepspeed=zero1"], "zero3": ["deepspeed=zero3"],
               "tp2": ["deepspeed=zero2", "trainer.tensor_parallel=2"]}
    losses = {}
    for name, extra in layouts.items():
        run = tmp_path / name
        train(2, run, shards, *extra, "deepspeed.precision=bf16", "trainer.max_tokens=384", "model.dropout=0.0",
              "model.attention_dropout=0.0", "logger.wandb=false")
        assert events(run, "start")[0]["precision"] == "bf16"
        losses[name] = [r["loss"] for r in steps(run)]
    assert len(losses["zero1"]) == 3 and losses["zero1"][-1] < losses["zero1"][0]
    for name in ("zero3", "tp2"):
        assert losses[name] == pytest.approx(losses["zero1"], rel=1e-2), name


def test_epochs_and_wandb_offline_run_read_back_with_wandb(shards, tmp_path):
    run = tmp_path / "run"
    train(1, run, shards, "trainer.max_epochs=2.5", "logger.wandb=true")
    rows = steps(run)
    assert len(rows) == 25
    for r in rows:  # epoch = tokens / training tokens
        assert r["epoch"] == pytest.approx(r["tokens_seen"] / (N_SAMPLES * SEQ))
        assert r["unique_tokens_seen"] == min(r["tokens_seen"], N_SAMPLES * SEQ)
    assert [e["epoch"] for e in events(run, "epoch_end")] == [1, 2]
    assert rows[-1]["loss"] < rows[0]["loss"]

    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    last_step = [h for h in history if "loss" in h][-1]  # validation rounds are logged after it too
    assert {"lr", "tokens_seen", "epoch", "grad_norm", "tokens_per_s", "mfu"} <= set(last_step)
    assert any("valid/seen/loss" in h and "valid/seen/syn/loss" in h and "validation_s" in h for h in history)
    assert {"source_tokens/syn", "source_epochs/syn"} <= set(last_step)
    (config,) = [r["run"]["config"]["update"] for r in records if r["type"] == "run"]
    assert config["optim"]["lr_max"] == 2e-3 and config["model"]["size"] == "tiny-2l"


def test_resume_ignores_runtime_knobs_and_refuses_another_model_shape(shards, tmp_path):
    run = tmp_path / "run"
    train(1, run, shards, "trainer.max_tokens=256", "logger.wandb=false")
    moved = tmp_path / "moved"  # the same shards at another path, other runtime knobs: no warning
    subprocess.run(["cp", "-r", str(shards), str(moved)], check=True)
    proc = train(1, run, moved, "trainer.max_tokens=384", "logger.wandb=false", "data.prefetch=1",
                 "trainer.log_interval_steps=2", "validation.enabled=false")
    assert "warning: resuming" not in proc.stderr
    assert events(run, "start")[-1]["resumed"] is True
    proc = train(1, run, moved, "trainer.max_tokens=512", "logger.wandb=false", "optim.lr_max=1e-3")
    assert "warning: resuming" in proc.stderr and "optim" in proc.stderr  # a changed optimizer only warns
    proc = train(1, run, moved, "trainer.max_tokens=640", "logger.wandb=false", "model.n_layers=3", expect=2)
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("gal-train: error:")]
    assert "model.n_layers=3 (saved: 2)" in line and "step00000004" in line
    assert "Traceback" not in proc.stderr and events(run, "start")[-1]["step"] == 3  # nothing was loaded
