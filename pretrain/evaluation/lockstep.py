"""Evaluation across data-parallel ranks in lockstep: the rules validation and the probes share.

* The model runs in eval mode (no dropout) for the evaluation and goes back to its mode after.
* Items are split round-robin over the data-parallel ranks (``share``).
* Every rank runs the same number of forward passes (``rounds``), a rank with nothing left takes
  part with a dummy batch: ZeRO-3 gathers parameters collectively, so a rank that stops early
  would hang the others.
* Counts and sums are all-reduced over the data-parallel group on the model's device (NCCL reduces
  GPU tensors only) and come back on the CPU.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from model import parallel

T = TypeVar("T")


@contextmanager
def eval_mode(engine):
    """The bare module in eval mode for the block (the DeepSpeed engine, or the module itself)."""
    module = getattr(engine, "module", engine)
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def share(items: Sequence[T]) -> Sequence[T]:
    """This data-parallel rank's items: every ``dp_size``-th, starting at its rank."""
    return items[parallel.dp_rank()::parallel.dp_size()]


def rounds(total: int, batch_size: int) -> int:
    """Batches every rank runs for ``total`` items shared over the data-parallel ranks."""
    return math.ceil(math.ceil(total / parallel.dp_size()) / batch_size)


def sum_over_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` summed over the data-parallel ranks (float64, back on the CPU)."""
    values = values.to(device=device, dtype=torch.float64)
    dist.all_reduce(values, group=parallel.dp_group())
    return values.cpu()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on some data-parallel rank."""
    return bool(sum_over_ranks(torch.tensor([float(flag)]), device).item() > 0)
