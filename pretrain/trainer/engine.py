"""The DeepSpeed engine: its JSON config from the Hydra groups, the optimizer groups, the LR schedule.

* ZeRO stage 1, 2 or 3 (``deepspeed.zero_stage``), optional CPU offload of optimizer states and
  (stage 3) parameters. ``deepspeed.precision``: DeepSpeed's bf16 mode (bf16 weights and activations, fp32
  master weights and optimizer states) or fp32; ``auto`` takes bf16 on a GPU and on a CPU with native bf16
  matmul (AVX-512 BF16 or AMX), fp32 on any other CPU (:func:`choose_precision`).
* AdamW with Galactica's betas (0.9, 0.95), weight decay 0.1 on the matmul weights only (not on
  LayerNorm weights, embeddings or biases), gradient clipping by DeepSpeed.
* LR: pretrain/trainer/schedule.py, handed to ``deepspeed.initialize`` as a LambdaLR.
"""
from __future__ import annotations

import deepspeed
import torch

from model import parallel
from pretrain.cli import third_party_output
from pretrain.config import TrainConfig
from pretrain.trainer.schedule import lr_lambda, warmup_steps

# DeepSpeed prints a line every ``steps_per_print`` steps; the run logs its own (pretrain/trainer/metrics.py)
NEVER = 2**31 - 1


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86 AVX-512 BF16 or AMX-BF16, what oneDNN's
    bf16 matmul uses); elsewhere bf16 is emulated and slower than fp32."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def choose_precision(cfg: TrainConfig, device: torch.device) -> tuple[str, str]:
    """(bf16 or fp32, why): ``deepspeed.precision``, ``auto`` resolved for ``device``."""
    p = cfg.deepspeed.precision
    if p != "auto":
        return p, f"deepspeed.precision={p}"
    if device.type == "cuda":
        return "bf16", "auto: bf16 on a GPU"
    if cpu_has_native_bf16():
        return "bf16", "auto: this CPU has native bf16 matmul (AVX-512 BF16 or AMX)"
    return "fp32", "auto: this CPU has no native bf16 matmul (AVX-512 BF16 or AMX), so fp32"


def deepspeed_config(cfg: TrainConfig, *, micro_batch_size: int, grad_accum: int, dp_size: int,
                     device: torch.device, load_universal: bool = False) -> dict:
    d, o = cfg.deepspeed, cfg.optim
    zero: dict = {"stage": d.zero_stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp_size,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr_max, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
            # torch's own AdamW: no compiled DeepSpeed op needed (fused kernels on GPU via torch)
            "torch_adam": True, "adam_w_mode": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": choose_precision(cfg, device)[0] == "bf16"},
        "zero_allow_untested_optimizer": True,
        # the CPU path has no compiled DeepSpeedCPUAdam: offloaded states step with torch's AdamW
        "zero_force_ds_cpu_optimizer": device.type == "cuda",
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    return _merge(config, dict(d.extra))


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k, {})), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matmul weights; not LayerNorm weights, embeddings (token and position) or biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.startswith(("wte.", "wpe.")) or name.endswith(".bias")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build(cfg: TrainConfig, model: torch.nn.Module, *, micro_batch_size: int, grad_accum: int,
          tokens_per_step: int, total_steps: int, device: torch.device, load_universal: bool = False):
    """``deepspeed.initialize`` with our config, optimizer groups, schedule and the mpu adapter."""
    warmup = warmup_steps(cfg.optim.warmup_tokens, tokens_per_step)
    schedule = lr_lambda(warmup, total_steps, cfg.optim.lr_final_ratio)
    ds_config = deepspeed_config(cfg, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                                 dp_size=parallel.dp_size(), device=device,
                                 load_universal=load_universal)
    with third_party_output():  # DeepSpeed's "... built successfully" of its CPU communication op
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config,
            mpu=parallel.DeepSpeedMPU(),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine, ds_config, warmup

