"""One optimizer step: the production step, also timed by bench/train_step.py.

Forward and backward of each micro-batch through the DeepSpeed engine (gradient accumulation,
ZeRO, clipping, AdamW and the LR schedule happen inside ``engine.backward`` / ``engine.step``).
Before the last micro-batch's backward, one all-reduce over all ranks carries both the step's loss
(→ its data-parallel mean; tensor-parallel ranks hold the same loss) and the preemption flag: the
step's only blocking host sync. The loss guard decides on that global loss, so every rank skips a
bad step together; a skipped step's last backward is fed a NaN loss, which makes DeepSpeed discard
the accumulated gradients itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.data.loader import Batch
from pretrain.trainer.faults import Drills
from pretrain.trainer.guards import LossGuard, Preemption


@dataclass
class StepResult:
    loss: float  # the global batch's mean loss over all data-parallel ranks
    skipped: str | None  # why the loss guard rejected the update, or None
    lr: float  # the rate this update used
    preempt: bool  # some rank has been signalled: checkpoint and stop


def train_step(engine, batches: list[Batch], device: torch.device, *, step: int, guard: LossGuard,
               preemption: Preemption, drills: Drills) -> StepResult:
    """Step ``step`` (1-based) on this rank's micro-batches of one global batch."""
    micro_losses = []
    for j, batch in enumerate(batches):
        loss = engine(batch.input_ids.to(device), batch.labels.to(device))
        micro_losses.append(loss.detach().float())
        if j == len(batches) - 1:  # decide on the global batch's loss before its last backward
            step_loss, preempt = _reduce(torch.stack(micro_losses).mean(), preemption.requested)
            step_loss = drills.loss(step, step_loss)
            bad = guard.is_bad(step_loss)
            lr = engine.get_lr()[0]  # the scheduler steps inside engine.step
            if bad:
                loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
    if bad and engine.was_step_applied():
        raise RuntimeError("DeepSpeed applied an update the loss guard rejected")
    guard.update(step_loss, bad)
    return StepResult(loss=step_loss, skipped=bad, lr=lr, preempt=preempt)


def _reduce(loss: torch.Tensor, signalled: bool) -> tuple[float, bool]:
    """(mean loss over all ranks, whether any rank was signalled), in one all-reduce (on the loss's
    device: NCCL reduces GPU tensors only)."""
    both = torch.stack([loss.double(), torch.tensor(float(signalled), dtype=torch.float64, device=loss.device)])
    dist.all_reduce(both)
    total, flags = both.tolist()
    return total / dist.get_world_size(), flags > 0
