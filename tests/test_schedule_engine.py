"""The LR schedule (pretrain/trainer/schedule.py) and the engine's pieces (pretrain/trainer/engine.py):
warmup from 0, decay to optim.lr_final_ratio, refresh_lr on a resume with a longer run, the optimizer
groups, the DeepSpeed JSON config and the precision rule. No DeepSpeed engine is started."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from helpers import train_cfg
from pretrain.config import ConfigError, model_preset
from pretrain.trainer.schedule import lr_lambda, refresh_lr, warmup_steps

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


# ----------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("tokens, per_step, expected", [(256, 128, 2), (257, 128, 3), (255, 128, 2), (128, 128, 1),
                                                        (1, 128, 1), (0, 128, 1), (375_000_000, 500_000, 750),
                                                        (200_000, 16_384, 13)])
def test_warmup_steps(tokens, per_step, expected):
    assert warmup_steps(tokens, per_step) == expected


def test_lr_lambda_warms_up_from_zero_then_decays_linearly_to_the_final_ratio():
    f = lr_lambda(4, 10, 0.1)
    # warmup: (s + 1) / 4, a line through 0 at s = -1 (the step before the first)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # decay: 1 - 0.9 * (s - 4 + 1) / 6, i.e. down by (1 - 0.1) / (10 - 4) = 0.15 a step after the peak at s = 3,
    # to 0.1 at s = 9 (the 10-step run's last update), and 0.1 ever after (the fraction is capped at 1)
    decay = [f(s) for s in range(4, 13)]
    assert decay == pytest.approx([0.85, 0.7, 0.55, 0.4, 0.25, 0.1, 0.1, 0.1, 0.1], abs=1e-15)
    assert f(9) == pytest.approx(0.1, abs=1e-15) and f(10) == pytest.approx(0.1, abs=1e-15)
    assert f(10_000) == pytest.approx(0.1, abs=1e-15)
    # the paper's recipe: never below the floor, never above the peak
    values = [f(s) for s in range(30)]
    assert min(values) == pytest.approx(0.1) and max(values) == 1.0
    assert values.count(1.0) == 1  # the peak is used by one update only (s = 3)


def test_lr_lambda_edges():
    # warmup fills the 1-step run: its one update at the peak, then 1 - 0.9 * min(1, (s - 1 + 1) / 1) = 0.1
    assert [lr_lambda(1, 1, 0.1)(s) for s in range(3)] == pytest.approx([1.0, 0.1, 0.1])
    # peak at s = 0, then 1 - 0.5 * s / 2: 0.75 at s = 1, 0.5 at s = 2 (the last of 3 updates) and after
    assert [lr_lambda(1, 3, 0.5)(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.5, 0.5]
    assert [lr_lambda(2, 5, 1.0)(s) for s in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]  # ratio 1: constant
    f = lr_lambda(3, 2, 0.1)  # warmup longer than the run: the 2 steps never reach the peak
    assert [f(s) for s in range(2)] == pytest.approx([1 / 3, 2 / 3]) and f(100) == pytest.approx(0.1)


def test_last_step_uses_the_final_ratio():
    # the last update of a 10-step run is s = 9: 1 - 0.9 * min(1, (9 - 4 + 1) / 6) = 0.1
    assert lr_lambda(4, 10, 0.1)(9) == pytest.approx(0.1)


def _optimizer(lr: float, schedule):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _run(opt, sched, n: int) -> list[float]:
    """The rate each of ``n`` updates uses (read before the step, as train_step does)."""
    used = []
    for _ in range(n):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return used


def test_lambdalr_rates_per_update():
    """Update s (1-based) uses lr_max × f(s - 1): the first update already has a rate above 0, the 4th the
    peak, the 10th (the run's last) the floor; two more past the planned end stay there."""
    opt, sched = _optimizer(1e-3, lr_lambda(4, 10, 0.1))
    used = _run(opt, sched, 12)
    assert used == pytest.approx([1e-3 * m for m in (0.25, 0.5, 0.75, 1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.1,
                                                      0.1, 0.1)], rel=1e-12)


class _Engine:
    def __init__(self, lr_scheduler):
        self.lr_scheduler = lr_scheduler


def test_refresh_lr_resume_with_a_longer_run():
    """A run planned for 6 steps, checkpointed after 4, resumed with 12: the next rate is the 12-step schedule's."""
    lr_max, warmup, ratio = 1e-3, 2, 0.1
    opt, sched = _optimizer(lr_max, lr_lambda(warmup, 6, ratio))
    _run(opt, sched, 4)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_max * 0.325, rel=1e-12)  # 1 - 0.9 * (4-2+1)/4
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())

    # the resumed process: a fresh optimizer and a scheduler with the new length, then the checkpoint
    opt2, sched2 = _optimizer(lr_max, lr_lambda(warmup, 12, ratio))
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert sched2.last_epoch == 4
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_max * 0.325, rel=1e-12)  # stale: the 6-step rate
    refresh_lr(_Engine(sched2))
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_max * 0.73, rel=1e-12)  # 1 - 0.9 * (4-2+1)/10
    # and the run goes on along the 12-step schedule: 1 - 0.9 * (s-1)/10 for its 8 remaining updates s = 4..11,
    # the last at the floor, and a 9th past the planned end (s = 12) stays there
    assert _run(opt2, sched2, 9) == pytest.approx(
        [lr_max * m for m in (0.73, 0.64, 0.55, 0.46, 0.37, 0.28, 0.19, 0.1, 0.1)], rel=1e-12)


def test_refresh_lr_sets_every_group_from_its_own_base_rate():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lr_lambda(2, 4, 0.1), lambda s: 0.25])
    sched.last_epoch = 2  # f(2) = 1 - 0.9 * (2-2+1)/2 = 0.55, apart from f(1) = 1.0 and f(3) = 0.1
    for g in opt.param_groups:
        g["lr"] = 123.0
    refresh_lr(_Engine(sched))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0 * 0.55, 0.5 * 0.25], rel=1e-12)


# ----------------------------------------------------------------------------- optimizer groups
def test_param_groups_of_the_model():
    from model import GalacticaLM, parallel
    from pretrain.trainer.engine import param_groups

    parallel.ensure_initialized()
    model = GalacticaLM(model_preset("tiny-2l", vocab_size=256))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    matmuls = [f"blocks.{i}.{m}.weight" for i in (0, 1) for m in ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")]
    assert [names[id(p)] for p in decay["params"]] == matmuls
    assert [names[id(p)] for p in no_decay["params"]] == [
        "wte.weight", "wpe.weight", "blocks.0.ln_1.weight", "blocks.0.ln_2.weight", "blocks.1.ln_1.weight",
        "blocks.1.ln_2.weight", "ln_f.weight"]


def test_param_groups_rules():
    from pretrain.trainer.engine import param_groups

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)  # fc.weight decays, fc.bias (1-D) does not
            self.bias = torch.nn.Parameter(torch.zeros(2, 2))  # 2-D but a bias by name: no decay
            self.gate = torch.nn.Parameter(torch.zeros(3, 3, 3))  # 3-D: decays
            self.frozen = torch.nn.Parameter(torch.zeros(3, 3), requires_grad=False)  # in no group

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = torch.nn.Embedding(10, 4), torch.nn.Embedding(8, 4)
            self.block = Block()
            self.norm = torch.nn.LayerNorm(4)
            self.head_wte = torch.nn.Linear(4, 4, bias=False)  # not the embedding: only the "wte." prefix counts

    net = Net()
    names = {id(p): n for n, p in net.named_parameters()}
    decay, no_decay = param_groups(net, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert sorted(names[id(p)] for p in decay["params"]) == ["block.fc.weight", "block.gate", "head_wte.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["block.bias", "block.fc.bias", "norm.bias",
                                                                "norm.weight", "wpe.weight", "wte.weight"]


# ----------------------------------------------------------------------------- the DeepSpeed config
def test_deepspeed_config_defaults_on_cpu():
    from pretrain.trainer.engine import NEVER, cpu_has_native_bf16, deepspeed_config

    cfg = train_cfg()
    ds = deepspeed_config(cfg, micro_batch_size=2, grad_accum=3, dp_size=4, device=CPU)
    assert ds == {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "train_batch_size": 24,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                                  "torch_adam": True, "adam_w_mode": True}},
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": cpu_has_native_bf16()},  # deepspeed.precision=auto (test_precision)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }


def test_deepspeed_config_follows_optim_and_deepspeed_groups():
    from pretrain.trainer.engine import deepspeed_config

    cfg = train_cfg("deepspeed=zero3_offload", "optim.lr_max=3e-4", "optim.beta1=0.8", "optim.beta2=0.99",
                    "optim.eps=1e-6", "optim.weight_decay=0.01", "optim.grad_clip=0.5")
    ds = deepspeed_config(cfg, micro_batch_size=1, grad_accum=8, dp_size=2, device=CPU, load_universal=True)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.01,
                                         "torch_adam": True, "adam_w_mode": True}
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "offload_param": {"device": "cpu", "pin_memory": False}}
    assert ds["checkpoint"] == {"load_universal": True}
    # on a GPU: bf16, pinned offload buffers, DeepSpeed's CPU Adam for offloaded states
    gpu = deepspeed_config(cfg, micro_batch_size=1, grad_accum=8, dp_size=2, device=CUDA)
    assert gpu["bf16"] == {"enabled": True} and gpu["zero_force_ds_cpu_optimizer"] is True
    assert gpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert gpu["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    only_opt = deepspeed_config(train_cfg("deepspeed=zero2_offload"), micro_batch_size=1, grad_accum=1, dp_size=1,
                                device=CPU)
    assert only_opt["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}


def test_deepspeed_extra_is_merged_recursively_and_last():
    from pretrain.trainer.engine import deepspeed_config

    cfg = train_cfg("deepspeed=zero3_offload", "+deepspeed.extra.zero_optimization.reduce_bucket_size=1000",
                    "+deepspeed.extra.zero_optimization.offload_param.pin_memory=true",
                    "+deepspeed.extra.optimizer.params.lr=0.5", "+deepspeed.extra.steps_per_print=10",
                    "+deepspeed.extra.bf16=false", "+deepspeed.extra.flops_profiler.enabled=true")
    extra_before = copy.deepcopy(cfg.deepspeed.extra)
    ds = deepspeed_config(cfg, micro_batch_size=1, grad_accum=1, dp_size=1, device=CPU)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "offload_param": {"device": "cpu", "pin_memory": True},
                                       "reduce_bucket_size": 1000}
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 0.5, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.1, "torch_adam": True,
                                                           "adam_w_mode": True}}
    assert ds["steps_per_print"] == 10
    assert ds["bf16"] is False  # a non-dict replaces a dict: the user's word is last
    assert ds["flops_profiler"] == {"enabled": True}
    assert cfg.deepspeed.extra == extra_before  # the config is not mutated
    again = deepspeed_config(cfg, micro_batch_size=1, grad_accum=1, dp_size=1, device=CPU)
    assert again == ds


@pytest.mark.parametrize("setting, device, native_bf16, expected", [
    ("auto", CPU, False, "fp32"), ("auto", CPU, True, "bf16"), ("auto", CUDA, False, "bf16"),
    ("fp32", CPU, True, "fp32"), ("fp32", CUDA, False, "fp32"), ("bf16", CUDA, False, "bf16"),
    ("bf16", CPU, False, "bf16")])
def test_precision(setting, device, native_bf16, expected, monkeypatch):
    """auto: bf16 on a GPU and on a CPU that multiplies bf16 in hardware, else fp32; an explicit setting wins."""
    from pretrain.trainer import engine

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native_bf16)  # the CPU rule without that CPU
    cfg = train_cfg(f"deepspeed.precision={setting}")
    chosen, why = engine.choose_precision(cfg, device)
    assert chosen == expected and why.startswith(setting if setting == "auto" else f"deepspeed.precision={setting}")
    ds = engine.deepspeed_config(cfg, micro_batch_size=1, grad_accum=1, dp_size=1, device=device)
    assert ds["bf16"] == {"enabled": expected == "bf16"}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU flags from Linux's /proc/cpuinfo")
def test_native_bf16_is_what_the_cpu_flags_say():
    from pretrain.trainer.engine import cpu_has_native_bf16

    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
