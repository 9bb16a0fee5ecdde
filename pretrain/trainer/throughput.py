"""Tokens per second and model FLOPs utilisation (MFU) of the training steps.

MFU = achieved model FLOPs / peak FLOPs of the devices (PaLM's definition; the model's FLOPs per
token from ``GalacticaLM.flops_per_token``). The peak of a GPU is its dense bf16 datasheet number; a
GPU not in the table gets no invented peak: MFU is left empty and the start event says why. On the
CPU, which has no single datasheet number, the peak is the fp32 matmul rate measured at start.
"""
from __future__ import annotations

import time

import torch

# Dense bf16 peak FLOP/s from the vendors' datasheets (without sparsity).
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "B200": 2250e12}
CPU_GEMM_SIZE, CPU_GEMM_REPEATS = 1024, 5  # the CPU peak: best of 5 timed 1024³ matmuls


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the number comes from); (None, why) when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in DENSE_BF16_PEAK.items():
            if key in name:
                return flops, f"{key} dense bf16 datasheet"
        return None, f"no datasheet peak for {name!r} (pretrain/trainer/throughput.py DENSE_BF16_PEAK): MFU not reported"
    n = CPU_GEMM_SIZE
    a = torch.full((n, n), 0.5)  # no RNG draw: the run's random streams must not depend on this
    best = float("inf")
    for _ in range(CPU_GEMM_REPEATS):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, f"fp32 {n}³ matmul measured on this CPU"


class StepTimer:
    """Tokens per second and model FLOPs utilisation over the steps since the last read."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, devices: int):
        """``peak_flops`` of one device (GPU, or one process's share of the CPU; None: unknown);
        ``devices`` of them."""
        self.flops_per_token, self.peak_flops, self.devices = flops_per_token, peak_flops, devices
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> tuple[float, float | None]:
        now = time.perf_counter()
        tps = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        if self.peak_flops is None:
            return tps, None
        return tps, tps * self.flops_per_token / (self.peak_flops * self.devices)

