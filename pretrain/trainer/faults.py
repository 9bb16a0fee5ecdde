"""Fault drills: the failures the tests and operators rehearse, in one place, off unless asked for.

Parsed once at start (:meth:`Drills.from_config`); the loop calls :meth:`Drills.after_step`, the
step calls :meth:`Drills.loss`, and the checkpoint's commit hook is :meth:`Drills.before_commit`.
No other module reads these variables.

* ``GAL_FAULT_KILL=step:N``: every rank SIGKILLs itself after step N is logged (lost work since the
  last checkpoint, no chance to clean up).
* ``GAL_FAULT_KILL=checkpoint:N``: rank 0 SIGKILLs itself after the shards of checkpoint N are written
  and before ``latest`` moves (a half-committed checkpoint).
* ``GAL_FAULT_PAUSE=step:N``: every rank waits after step N until SIGUSR1/SIGTERM arrives, so a
  preemption lands at a known step however fast the machine is. The flag travels with the next
  step's loss reduce (pretrain/trainer/step.py), so the run stops after step N+1.
* ``trainer.inject_nan_at_steps=[...]``: the global loss of those steps reads as NaN (the loss guard
  then skips the update).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

KILL_ENV, PAUSE_ENV = "GAL_FAULT_KILL", "GAL_FAULT_PAUSE"
PAUSE_TIMEOUT_S = 600.0  # a paused rank gives up waiting for the signal after this long


def _parse(environ: Mapping[str, str], name: str, kinds: tuple[str, ...]) -> tuple[str, int] | None:
    value = environ.get(name)
    if not value:
        return None
    kind, _, step = value.partition(":")
    if kind not in kinds or not step.isdigit():
        from pretrain.config import ConfigError

        raise ConfigError(f"{name}={value!r}: expected " + " or ".join(f"{k}:N" for k in kinds))
    return kind, int(step)


@dataclass(frozen=True)
class Drills:
    kill: tuple[str, int] | None = None  # ("step" | "checkpoint", N)
    pause_after_step: int | None = None
    nan_at_steps: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_config(cls, inject_nan_at_steps, environ: Mapping[str, str] = os.environ) -> "Drills":
        pause = _parse(environ, PAUSE_ENV, ("step",))
        return cls(kill=_parse(environ, KILL_ENV, ("step", "checkpoint")),
                   pause_after_step=pause[1] if pause else None, nan_at_steps=frozenset(inject_nan_at_steps))

    @property
    def active(self) -> bool:
        return bool(self.kill or self.pause_after_step is not None or self.nan_at_steps)

    def loss(self, step: int, loss: float) -> float:
        return float("nan") if step in self.nan_at_steps else loss

    def after_step(self, step: int, signalled: Callable[[], bool]) -> None:
        if self.kill == ("step", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.pause_after_step == step:
            deadline = time.monotonic() + PAUSE_TIMEOUT_S
            while not signalled() and time.monotonic() < deadline:
                time.sleep(0.05)

    def before_commit(self, step: int) -> None:
        if self.kill == ("checkpoint", step):
            os.kill(os.getpid(), signal.SIGKILL)
