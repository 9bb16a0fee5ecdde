"""The training loop. Each step, in this order: batch, step, log, epoch end, validation, drills,
guard stop, preemption, checkpoint. The concerns are small functions below; what they use is built
by pretrain/trainer/setup.py.

Exit codes: ``EXIT_DONE`` (0); ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again later") after
SIGUSR1/SIGTERM and a checkpoint (slurm/pretrain.sbatch requeues on it); ``EXIT_LOSS_GUARD`` (3) after
``trainer.max_consecutive_skips`` bad steps in a row (the last state checkpointed).
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from launch.slurm import EXIT_PREEMPTED
from pretrain.cli import EXIT_DONE, EXIT_LOSS_GUARD
from pretrain.analysis.records import read_metrics
from pretrain.config import model_shape
from pretrain.data.loader import epochs_completed
from pretrain.trainer import checkpoint
from pretrain.trainer.setup import Run, client_state
from pretrain.trainer.step import StepResult, train_step



def fit(run: Run) -> int:
    """Train until the run's length, a preemption or the loss guard; returns the exit code."""
    cfg, state, shapes, metrics = run.cfg, run.state, run.shapes, run.metrics
    t = cfg.trainer
    next_ckpt = _next_multiple(state.tokens_seen, cfg.checkpoint.interval_tokens)
    if cfg.validation.enabled and cfg.validation.at_start and not validated_at(run, state.step):
        validation_round(run, "start")  # a fresh model's, or a loaded checkpoint's not yet evaluated
    exit_code = EXIT_DONE
    while state.step < shapes.total_steps:
        with run.timer.step(shapes.tokens_per_step):
            batches = run.loader.next_global_batch()
            result = train_step(run.engine, batches, run.device, step=state.step + 1, guard=run.guard,
                                preemption=run.preemption, drills=run.drills)
        if run.sample_log:
            run.sample_log.write(state.step + 1, batches)
        before, state.step, state.tokens_seen = state.tokens_seen, state.step + 1, state.tokens_seen + shapes.tokens_per_step

        if state.step % t.log_interval_steps == 0 or result.skipped or state.step == shapes.total_steps:
            log_step(run, result, batches)
        if epochs_completed(before, state.tokens_seen, shapes.tokens_per_epoch):
            metrics.event("epoch_end", step=state.step, tokens_seen=state.tokens_seen,
                          epoch=state.tokens_seen // shapes.tokens_per_epoch, loss=result.loss)
        why = run.schedule.reason(before, state.tokens_seen)
        if why:
            validation_round(run, why)
        run.drills.after_step(state.step, lambda: run.preemption.requested)
        if state.consecutive_skips >= t.max_consecutive_skips:
            metrics.event("stopped", step=state.step, reason=f"{state.consecutive_skips} bad steps in a row "
                          f"(trainer.max_consecutive_skips={t.max_consecutive_skips}); last: {result.skipped}")
            exit_code = EXIT_LOSS_GUARD
            break
        if result.preempt:
            metrics.event("preempted", step=state.step, tokens_seen=state.tokens_seen)
            exit_code = EXIT_PREEMPTED
            break
        if next_ckpt is not None and state.tokens_seen >= next_ckpt and state.step < shapes.total_steps:
            save_checkpoint(run)
            next_ckpt = _next_multiple(state.tokens_seen, cfg.checkpoint.interval_tokens)
    save_checkpoint(run)
    if exit_code == EXIT_DONE:
        metrics.event("done", step=state.step, tokens_seen=state.tokens_seen, epoch=run.loader.epoch)
    close(run)
    return exit_code


def log_step(run: Run, result: StepResult, batches) -> None:
    """A metrics row (metrics.jsonl, wandb) and the progress line."""
    state, loader = run.state, run.loader
    row = {"step": state.step, "tokens_seen": state.tokens_seen, "epoch": loader.epoch,
           "unique_tokens_seen": loader.unique_samples_seen() * run.shapes.seq_len,
           "repeat": float(sum(b.epochs.mean() for b in batches) / len(batches)), **loader.accounting(run.shapes.seq_len),
           "loss": result.loss, "lr": result.lr, "grad_norm": _grad_norm(run.engine),
           **run.timer.read(), "skipped_steps": state.skipped_steps}
    if result.skipped:
        row["skipped"] = result.skipped
    run.metrics.log(row)
    run.progress.update(row)


def validated_at(run: Run, step: int) -> bool:
    """Whether metrics.jsonl already holds a validation round at ``step`` (the main rank reads, all agree):
    a resume does not repeat the round its checkpoint's step already had."""
    answer = [run.metrics.enabled and any(r.get("event") == "validation" and r.get("step") == step
                                          for r in read_metrics(run.metrics.path))]
    dist.broadcast_object_list(answer, src=0)
    return answer[0]


def validation_round(run: Run, reason: str) -> None:
    """Evaluate, record, and (main rank) update the online double-descent verdict."""
    state, loader = run.state, run.loader
    start = time.perf_counter()
    with run.timer.other("validation"):
        result = run.validator.run(run.engine, run.device)
    run.metrics.validation(step=state.step, tokens_seen=state.tokens_seen, epoch=loader.epoch,
                           repeat=math.floor(loader.epoch), reason=reason, seconds=time.perf_counter() - start,
                           **result)
    verdict = run.watch.update() if run.watch is not None else None
    if verdict:
        run.metrics.event("double_descent", to_wandb=True, step=state.step, tokens_seen=state.tokens_seen,
                          series="aggregate", **verdict)


def save_checkpoint(run: Run) -> None:
    start = time.perf_counter()
    with run.timer.other("checkpoint"):
        tag = checkpoint.save(run.engine, run.ckpt_dir, run.state.step,
                              client_state(run.loader, run.state, run.cfg, run.config_hash), run.cfg.checkpoint.keep_last,
                              model_shape=model_shape(run.model_cfg), lineage=run.lineage,
                              before_commit=run.drills.before_commit)
    run.metrics.event("checkpoint", step=run.state.step, tokens_seen=run.state.tokens_seen, tag=tag,
                      seconds=round(time.perf_counter() - start, 3))


def close(run: Run) -> None:
    run.progress.close()
    run.loader.close()
    run.metrics.close()
    dist.barrier()
    if run.lock is not None:
        run.lock.release()


def _next_multiple(tokens: int, interval: int | None) -> int | None:
    return None if not interval else (tokens // interval + 1) * interval


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm.item() if torch.is_tensor(norm) else norm)
    return norm if math.isfinite(norm) else None
