"""What stops or skips a step: the loss guard (bad losses) and preemption (signals)."""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass


@dataclass
class TrainState:
    """The loop's counters; saved in every checkpoint."""

    step: int = 0  # optimizer steps, skipped ones included
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    loss_ewma: float | None = None
    ewma_steps: int = 0


class LossGuard:
    """Skip the update when the loss is not finite or spikes above ``factor`` × its EWMA (metaseq's
    skip_spike). All ranks decide on the same all-reduced loss, so they skip together."""

    def __init__(self, trainer_conf, state: TrainState):
        t = trainer_conf
        self.factor, self.beta, self.warmup = t.loss_spike_factor, t.loss_ewma_beta, t.loss_spike_warmup_steps
        self.state = state

    def is_bad(self, loss: float) -> str | None:
        s = self.state
        if not math.isfinite(loss):
            return "non-finite loss"
        if s.loss_ewma is not None and s.ewma_steps >= self.warmup and loss > self.factor * s.loss_ewma:
            return f"loss spike ({loss:.4g} > {self.factor} × EWMA {s.loss_ewma:.4g})"
        return None

    def update(self, loss: float, bad: str | None) -> None:
        s = self.state
        if bad:
            s.skipped_steps += 1
            s.consecutive_skips += 1
            return
        s.consecutive_skips = 0
        s.loss_ewma = loss if s.loss_ewma is None else self.beta * s.loss_ewma + (1 - self.beta) * loss
        s.ewma_steps += 1


class Preemption:
    """SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (scancel, preemption) set a flag;
    the ranks agree on it in the next step's loss reduce (pretrain/trainer/step.py), then the loop
    checkpoints and exits with EXIT_PREEMPTED."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
