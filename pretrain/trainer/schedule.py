"""The learning-rate schedule (Galactica: linear warmup from 0, then linear decay to 10% of the peak).

A ``torch.optim.lr_scheduler.LambdaLR`` handed to ``deepspeed.initialize``, which steps and
checkpoints it. (DeepSpeed's ``WarmupDecayLR`` warms up *from* the floor it decays to, so it cannot
start at 0 and end at 10%.)
"""
from __future__ import annotations

import math
from typing import Callable


def warmup_steps(warmup_tokens: int, tokens_per_step: int) -> int:
    """``optim.warmup_tokens`` in optimizer steps (at least one)."""
    return max(1, math.ceil(warmup_tokens / tokens_per_step))


def lr_lambda(warmup_steps: int, total_steps: int, final_ratio: float) -> Callable[[int], float]:
    """Multiplier of lr_max for the update after ``s`` earlier ones (``s`` 0-based, as LambdaLR counts):
    (s+1)/warmup up to the peak at s = warmup-1, then linear down to ``final_ratio``, reached by the last
    update (s = total-1) and kept after it (a run resumed past its planned end)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 1.0 - (1.0 - final_ratio) * min(1.0, (step - warmup_steps + 1) / span)
    return f


def refresh_lr(engine) -> None:
    """After a resume, set the rate of the next step from the schedule (LambdaLR only re-evaluates it
    on step(), so a run resumed with a longer trainer.max_tokens would otherwise use a stale rate)."""
    sched = engine.lr_scheduler
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)
