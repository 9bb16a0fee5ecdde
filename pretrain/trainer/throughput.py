"""Tokens per second and model FLOPs utilisation (MFU) of the training steps.

MFU = achieved model FLOPs / peak FLOPs of the devices (PaLM's definition; the model's FLOPs per
token from ``GalacticaLM.flops_per_token``). The peak of a GPU is its dense bf16 datasheet number; a
GPU not in the table gets no invented peak: MFU is left empty and the start event says why. On the
CPU, which has no single datasheet number, the peak is the matmul rate measured at start in the run's
precision (bf16 or fp32).
"""
from __future__ import annotations

import contextlib
import time

import torch

# Dense bf16 peak FLOP/s from the vendors' datasheets (without sparsity).
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "B200": 2250e12}
CPU_GEMM_SIZE, CPU_GEMM_REPEATS = 1024, 5  # the CPU peak: best of 5 timed 1024³ matmuls


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for ``precision``, where the number comes from); (None, why) when unknown.
    A GPU's is its bf16 datasheet number (DeepSpeed's bf16 mode multiplies in bf16)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in DENSE_BF16_PEAK.items():
            if key in name:
                return flops, f"{key} dense bf16 datasheet"
        return None, f"no datasheet peak for {name!r} (pretrain/trainer/throughput.py DENSE_BF16_PEAK): MFU not reported"
    n = CPU_GEMM_SIZE
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.full((n, n), 0.5, dtype=dtype)  # no RNG draw: the run's random streams must not depend on this
    best = float("inf")
    for _ in range(CPU_GEMM_REPEATS):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, f"{precision} {n}³ matmul measured on this CPU"


class StepTimer:
    """Tokens per second and MFU of the training steps alone (the batch's loading, forward, backward and
    optimizer step), over the steps since the last read; the time spent in validation and checkpoints is
    kept apart (``time/validation_s``, ``time/checkpoint_s``), so a step after a validation round reads
    like its neighbours.

        with timer.step(tokens): ...train...     with timer.other("validation"): ...validate...
    """

    def __init__(self, flops_per_token: float, peak_flops: float | None, devices: int):
        """``peak_flops`` of one device (GPU, or one process's share of the CPU; None: unknown);
        ``devices`` of them."""
        self.flops_per_token, self.peak_flops, self.devices = flops_per_token, peak_flops, devices
        self.seconds, self.tokens = 0.0, 0
        self.others: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, tokens: int):
        t = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - t
        self.tokens += tokens

    @contextlib.contextmanager
    def other(self, what: str):
        t = time.perf_counter()
        yield
        self.others[what] = self.others.get(what, 0.0) + time.perf_counter() - t

    def read(self) -> dict[str, float | None]:
        """``tokens_per_s``, ``mfu`` and ``time/<what>_s`` since the last read; then starts over."""
        tps = self.tokens / max(self.seconds, 1e-9)
        mfu = None if self.peak_flops is None else tps * self.flops_per_token / (self.peak_flops * self.devices)
        out = {"tokens_per_s": tps, "mfu": mfu, "time/step_s": self.seconds,
               **{f"time/{what}_s": s for what, s in self.others.items()}}
        self.seconds, self.tokens, self.others = 0.0, 0, {}
        return out
