"""gal-plan: memory, FLOPs and time of a training layout, before you ask a cluster for it.

    gal-plan --model 30b --nodes 16 --tp 4 --zero 2 --micro-batch 2
    gal-plan --model 120b --nodes 128 --suggest

Everything is arithmetic on the model's shape (model/config.py); nothing is allocated. The three
parts of GPU memory, per GPU:

**Model states** (DeepSpeed's mixed-precision ZeRO accounting, bytes per parameter of this GPU's
tensor-parallel shard, P = shard params, D = data-parallel ranks = GPUs / TP, w = 2 for bf16, 4 fp32):

    stage | weights (w) | grads          | fp32 master (4) | fp32 grads (4) | Adam m, v (8) | gathered layer
    0     | P           | w·P            | P (bf16 only)   | P (bf16 only)  | P             |
    1     | P           | w·P            | P/D             | P/D            | P/D           |
    2     | P           | w·P/D          | P/D             | P/D            | P/D           |
    3     | P/D         | (none kept)    | P/D             | P/D            | P/D           | 2·w·largest layer

This is the accounting of DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` in
stage_1_and_2.py: 2·P + 18·P/D; ``estimate_zero3_model_states_mem_needs`` in stage3.py:
4·largest + 18·P/D), which tests/test_plan.py calls for real. Where we differ, on purpose:

* Tensor parallelism: DeepSpeed's estimators know no TP. We apply them to one TP shard
  (P = split params / TP + replicated params, D = GPUs / TP); at TP=1 the numbers are identical.
* ``--offload optimizer`` puts the fp32 master, fp32 grads and Adam states in host memory (ZeRO-2
  keeps only the bf16 weights on the GPU, ZeRO-3 its bf16 weight partition); ``--offload param``
  (ZeRO-3) also the weight partition. The host side is reported per node without DeepSpeed's 1.5
  "additional buffer factor".
* fp32 (the CPU path): DeepSpeed still keeps a separate fp32 master copy and fp32 gradient partition
  at stages 1-3 (it clones the partition), so stage 2 fp32 costs 4·P + 20·P/D, not 16 bytes.
* ZeRO-0/1 are not covered by DeepSpeed's estimators; the table above is our reading of its
  BF16_Optimizer (stage 0) and stage-1 optimizer.

**Activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", eq. 1-2, no sequence parallelism), per layer and micro-batch of b sequences of s tokens:

    s·b·h·(10 + 24/t) bytes in bf16 (t = TP; 34 at t=1), plus 5·a·s²·b/t for the attention scores

In units of the element size w: 16 saved s·b·h-sized tensors (4 replicated over TP, 12 split) plus
two 1-byte dropout masks, i.e. s·b·h·(4w + 2 + 12w/t). ``--attention flash`` (the default) drops the
a·s² term: our attention is ``F.scaled_dot_product_attention``, which on GPUs runs the flash /
memory-efficient kernels (attention dropout included) that never store the s×s scores.
``--attention math`` keeps it as a·s²·b·(2w + 1)/t (probabilities, dropout mask, dropped
probabilities): SDPA falls back to that on the CPU whenever attention dropout is on.
With ``--activation-checkpointing`` (full recompute, one checkpoint per block) each layer keeps only
its input (w·s·b·h), and one layer's full activations live again during its backward.
On top: the final LayerNorm's input and output (2·w·s·b·h) and the logits for the 50k vocabulary,
which are large: the w-byte logits, their fp32 copy for the loss and the fp32 softmax megatron's
vocab-parallel cross-entropy saves, s·b·V/t·(w + 4 + 4) bytes (no copy when w is already fp32).

**Buffers**: DeepSpeed's gradient-reduction bucket (``reduce_bucket_size`` = 5e8 elements by default,
in the gradient-accumulation dtype, which defaults to the model's: w bytes; two of them with ``overlap_comm``, the default at stage 3),
the stage-3 prefetch bucket (5e7 elements), and 2 GiB for the CUDA context, NCCL and cuBLAS workspaces.
"Fits" leaves ``--headroom`` (10%) of the GPU for the allocator's fragmentation.

**FLOPs** per token follow ``GalacticaLM.flops_per_token`` and the trainer's MFU: 6·N (N = all
matmul weights; the tied embedding counted once, as the LM head) + 6·L·s·h for causal attention
(PaLM appendix B counts 12·L·s·h, the full s×s matrix; the causal half is what is computed). Time to
train = tokens · FLOPs per token / (GPUs · peak · MFU), with activation recomputation *not* counted
as useful FLOPs (it costs time: ×4/3 in ``--suggest``'s ranking).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace

from launch.env import check_topology
from model.config import GalacticaConfig
from pretrain.cli import fail
from pretrain.config import (CONF_DIR, ConfigError, divisible_global_batch_samples, global_batch_samples, model_preset,
                             model_sizes)

GIB = 2**30
TERA = 1e12
CONF_MODEL = CONF_DIR / "model"
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py); our conf/deepspeed/*.yaml keep them.
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
CUDA_CONTEXT_BYTES = 2 * GIB
# Bandwidths for --suggest's ranking (per GPU, bytes/s): NVLink 4 within a node, 400 Gb/s NDR between
# nodes, PCIe 5 x16 to the host. Rough on purpose: they only order layouts.
NVLINK_BW, NETWORK_BW, PCIE_BW = 300e9, 50e9, 25e9
# Host-side Adam of an offloaded optimizer, parameters updated per second per GPU: a rough figure for
# DeepSpeed's vectorised CPU Adam, again only to order layouts.
HOST_ADAM_PARAMS_PER_S = 1e9
# Full recompute adds a second forward to forward + backward (a backward costs about two forwards): 4/3.
RECOMPUTE_COST = 4 / 3
# TP all-reduces of an s·b·h activation per layer and micro-step (Megatron-LM, Shoeybi et al. 2019,
# fig. 3-4: two forward, after attention and MLP, two backward), and with full recompute the
# forward's two again.
TP_ALLREDUCES_PER_LAYER, TP_ALLREDUCES_PER_LAYER_RECOMPUTE = 4, 6
# --suggest's search: TP sizes (powers of two within a node), micro batches, how far the global batch
# may move to split evenly (beyond that the layout is dropped, not the batch changed), and the cost
# ratio within which layouts tie (then the simpler one wins).
SUGGEST_TP = (1, 2, 4, 8, 16)
SUGGEST_MICRO_BATCH = (1, 2, 4, 8, 16, 32)
SUGGEST_MAX_BATCH_CHANGE = 0.25
SUGGEST_COST_TIE = 1.02
SIZE_NAMES = model_sizes()  # conf/model/*.yaml


@dataclass
class Layout:
    model: str = "125m"
    vocab_size: int = 50000  # Galactica's 50k-token vocabulary (the paper's tokenizer)
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    cpu_memory_gib: float = 2000.0
    tp: int = 1
    zero: int = 2
    offload: str = "none"  # none | optimizer | param
    micro_batch: int = 1
    seq_len: int = 2048
    activation_checkpointing: bool = False
    dtype: str = "bf16"
    attention: str = "flash"  # flash | math
    global_batch_tokens: int | None = None  # None: the size's Table-5 batch (conf/model/<size>.yaml)
    tokens: float = 450e9  # the paper trains every size for 450B tokens
    mfu: float = 0.4
    peak_tflops: float = 989.0  # H100 SXM dense bf16 (NVIDIA's datasheet; 1979 is with sparsity)
    headroom: float = 0.1

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def w(self) -> int:
        return 2 if self.dtype == "bf16" else 4

    def config(self) -> GalacticaConfig:
        return model_preset(self.model, vocab_size=self.vocab_size,
                            activation_checkpointing=self.activation_checkpointing)


def table5_batch_tokens(size: str) -> int:
    """trainer.global_batch_tokens of conf/model/<size>.yaml (the paper's Table 5 for paper sizes)."""
    from omegaconf import OmegaConf
    path = CONF_MODEL / f"{size}.yaml"
    if not path.exists():
        raise ConfigError(f"--global-batch-tokens: no default, {path} is missing; pass it explicitly")
    return int(OmegaConf.load(path).trainer.global_batch_tokens)


def validate(lay: Layout) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)
    need(lay.model in SIZE_NAMES, f"--model {lay.model!r} is unknown; choose one of {SIZE_NAMES}")
    for flag, value in (("--nodes", lay.nodes), ("--gpus-per-node", lay.gpus_per_node), ("--tp", lay.tp),
                        ("--micro-batch", lay.micro_batch), ("--seq-len", lay.seq_len),
                        ("--vocab-size", lay.vocab_size)):
        need(isinstance(value, int) and value >= 1, f"{flag} must be a positive integer, got {value!r}")
    for flag, value in (("--gpu-memory-gib", lay.gpu_memory_gib), ("--cpu-memory-gib", lay.cpu_memory_gib),
                        ("--tokens", lay.tokens), ("--peak-tflops", lay.peak_tflops)):
        need(value > 0, f"{flag} must be > 0, got {value!r}")
    need(0 < lay.mfu <= 1, f"--mfu must be in (0, 1], got {lay.mfu!r}")
    need(0 <= lay.headroom < 1, f"--headroom must be in [0, 1), got {lay.headroom!r}")
    need(lay.zero in (0, 1, 2, 3), f"--zero must be 0, 1, 2 or 3, got {lay.zero!r}")
    need(lay.offload in ("none", "optimizer", "param"), f"--offload must be none, optimizer or param, got {lay.offload!r}")
    need(lay.offload != "param" or lay.zero == 3, f"--offload param needs --zero 3 (got --zero {lay.zero})")
    need(lay.offload == "none" or lay.zero >= 1, "--offload needs --zero 1, 2 or 3")
    need(lay.dtype in ("bf16", "fp32"), f"--dtype must be bf16 or fp32, got {lay.dtype!r}")
    need(lay.attention in ("flash", "math"), f"--attention must be flash or math, got {lay.attention!r}")
    cfg = lay.config()
    need(lay.seq_len <= cfg.max_positions, f"--seq-len {lay.seq_len} exceeds the model's {cfg.max_positions} positions")
    try:  # the trainer's own checks: TP divides the GPUs, stays in a node, and splits the model's widths
        check_topology(lay.gpus, lay.tp, lay.gpus_per_node, gpus=True)
        cfg.validate_tensor_parallel(lay.tp)
    except ValueError as e:
        raise ConfigError(f"--tp {lay.tp}: {e}") from None
    if lay.global_batch_tokens is not None:
        need(lay.global_batch_tokens >= lay.seq_len,
             f"--global-batch-tokens {lay.global_batch_tokens} is below one sequence of --seq-len {lay.seq_len}")


# --------------------------------------------------------------------------- parameters
def param_counts(cfg: GalacticaConfig, tp: int = 1) -> dict:
    """Parameters of the model (as ``GalacticaLM.num_parameters``), of one TP shard, and the largest
    single module of a shard (DeepSpeed's ``largest_layer_params``: the token embedding or fc_in)."""
    h, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    split_per_layer = 3 * h * h + h * h + 2 * h * cfg.d_ffn  # qkv, proj, fc_in, fc_out
    replicated_per_layer = 2 * h  # two LayerNorm weights (no biases)
    if cfg.bias:
        split_per_layer += 3 * h + cfg.d_ffn
        replicated_per_layer += 2 * h + h + h  # LayerNorm biases, proj and fc_out biases
    split = V * h + L * split_per_layer
    replicated = cfg.max_positions * h + L * replicated_per_layer + h * (2 if cfg.bias else 1)
    return {
        "total": split + replicated,
        "matmul": split,  # everything but the position table and LayerNorms: what 6·N counts
        "per_tp_shard": split // tp + replicated,
        "largest_layer": max(V * h, h * cfg.d_ffn) // tp,
    }


def flops_per_token(cfg: GalacticaConfig, seq_len: int) -> float:
    """Same as ``GalacticaLM.flops_per_token``: 6·N (matmul weights, embedding once) + 6·L·s·h."""
    n = param_counts(cfg)["total"] - cfg.max_positions * cfg.d_model  # num_parameters(include_positions=False)
    return 6.0 * n + 6.0 * cfg.n_layers * seq_len * cfg.d_model


# --------------------------------------------------------------------------- memory
def model_states(lay: Layout) -> dict:
    """Bytes of model states per GPU (``gpu``) and offloaded to host memory per GPU (``host``)."""
    pc = param_counts(lay.config(), lay.tp)
    P, D, w, z = pc["per_tp_shard"], lay.dp, lay.w, lay.zero
    part = {"weights": w * P / (D if z == 3 else 1),
            "grads": 0.0 if z == 3 else w * P / (D if z == 2 else 1),
            # stage 0 fp32: torch's AdamW steps the weights themselves, no master or second grad copy
            "fp32_master": 0.0 if (z == 0 and w == 4) else 4 * P / (D if z else 1),
            "fp32_grads": 0.0 if (z == 0 and w == 4) else 4 * P / (D if z else 1),
            "adam_moments": 8 * P / (D if z else 1),
            "gathered_layer": 2 * w * pc["largest_layer"] if z == 3 else 0.0}
    on_host = set()
    if lay.offload in ("optimizer", "param"):
        on_host |= {"fp32_master", "fp32_grads", "adam_moments"}
        if z == 2:
            on_host.add("grads")  # DeepSpeed copies each reduced grad partition straight to the host
    if lay.offload == "param":
        on_host.add("weights")
    gpu = {k: (0.0 if k in on_host else v) for k, v in part.items()}
    host = {k: v for k, v in part.items() if k in on_host}
    return {"gpu": gpu, "gpu_total": sum(gpu.values()), "host": host, "host_total": sum(host.values())}


def activations(lay: Layout) -> dict:
    """Bytes of activations per GPU for one micro-batch (see the module docstring)."""
    cfg = lay.config()
    s, b, h, a, L, V, t, w = lay.seq_len, lay.micro_batch, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.vocab_size, lay.tp, lay.w
    sbh = s * b * h
    per_layer = sbh * (4 * w + 2 + 12 * w / t)
    if lay.attention == "math":
        per_layer += a * s * s * b * (2 * w + 1) / t
    if lay.activation_checkpointing:
        layers = L * w * sbh + per_layer  # every block's input, plus one block recomputed in backward
    else:
        layers = L * per_layer
    head = 2 * w * sbh  # final LayerNorm input and output
    logits = s * b * V / t * (w + 4 + (4 if w != 4 else 0))
    return {"layers": layers, "final_norm": head, "logits": logits, "total": layers + head + logits}


def buffers(lay: Layout, touched_only: bool = False) -> dict:
    """DeepSpeed's communication buckets and the CUDA context. ``touched_only``: count only the part of
    a bucket that gradients ever fill (what a CPU process's resident memory shows; no CUDA context)."""
    if lay.zero == 0:
        out = {"reduce_bucket": 0.0, "prefetch_bucket": 0.0}
    else:
        elements = REDUCE_BUCKET
        if touched_only:
            elements = min(elements, param_counts(lay.config(), lay.tp)["per_tp_shard"])
        dtype_bytes = lay.w  # the gradient-accumulation dtype: DeepSpeed's default is the model's
        copies = 2 if lay.zero == 3 else 1  # overlap_comm: on by default at stage 3 only
        out = {"reduce_bucket": float(elements * dtype_bytes * copies),
               "prefetch_bucket": float(PREFETCH_BUCKET * lay.w) if lay.zero == 3 and not touched_only else 0.0}
    out["cuda_context"] = 0.0 if touched_only else float(CUDA_CONTEXT_BYTES)
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------- the plan
def global_batch(lay: Layout) -> dict:
    """Sequences per step as gal-train rounds them, and whether they split over micro-batch × DP."""
    tokens = lay.global_batch_tokens or table5_batch_tokens(lay.model)
    samples = global_batch_samples(tokens, lay.seq_len)
    per = lay.micro_batch * lay.dp
    ok = samples % per == 0
    fixed = divisible_global_batch_samples(samples, per)
    return {"tokens": tokens, "samples": samples, "grad_accum": samples // per if ok else None,
            "divisible": ok, "suggested_tokens": fixed * lay.seq_len, "suggested_samples": fixed}


def plan(lay: Layout) -> dict:
    validate(lay)
    cfg = lay.config()
    pc = param_counts(cfg, lay.tp)
    ms, act, buf = model_states(lay), activations(lay), buffers(lay)
    gpu_total = ms["gpu_total"] + act["total"] + buf["total"]
    usable = lay.gpu_memory_gib * GIB * (1 - lay.headroom)
    host_per_node = ms["host_total"] * lay.gpus_per_node
    fits_gpu, fits_host = gpu_total <= usable, host_per_node <= lay.cpu_memory_gib * GIB
    gb = global_batch(lay)
    fpt = flops_per_token(cfg, lay.seq_len)
    steps = lay.tokens / (gb["samples"] * lay.seq_len)
    flops_step = fpt * gb["samples"] * lay.seq_len
    seconds = lay.tokens * fpt / (lay.gpus * lay.peak_tflops * TERA * lay.mfu)
    return {
        "layout": asdict(lay) | {"global_batch_tokens": gb["tokens"], "dp": lay.dp, "gpus": lay.gpus},
        "params": pc,
        "memory_per_gpu": {"model_states": ms["gpu"], "model_states_total": ms["gpu_total"],
                           "activations": act, "buffers": buf, "total": gpu_total, "usable": usable},
        "host_per_node": {"offloaded_states": host_per_node, "capacity": lay.cpu_memory_gib * GIB},
        "fits": fits_gpu and fits_host, "fits_gpu": fits_gpu, "fits_host": fits_host,
        "batch": gb,
        "flops": {"per_token": fpt, "per_step": flops_step, "total": fpt * lay.tokens},
        "time": {"steps": steps, "seconds": seconds, "days": seconds / 86400,
                 "step_seconds": seconds / steps, "gpu_hours": seconds * lay.gpus / 3600},
        "overrides": overrides(lay, gb),
    }


def overrides(lay: Layout, gb: dict) -> list[str]:
    """gal-train (and slurm/pretrain.sbatch) Hydra overrides for this layout (conf/, pretrain/config.py)."""
    ds = {("none", 0): "zero0", ("none", 1): "zero1", ("none", 2): "zero2", ("none", 3): "zero3",
          ("optimizer", 2): "zero2_offload", ("param", 3): "zero3_offload"}
    out = [f"model={lay.model}", f"trainer.tensor_parallel={lay.tp}", f"trainer.micro_batch_size={lay.micro_batch}"]
    if (lay.offload, lay.zero) in ds:
        out.append(f"deepspeed={ds[lay.offload, lay.zero]}")
    else:  # ZeRO-1/3 with only the optimizer offloaded
        out += [f"deepspeed=zero{lay.zero}", "deepspeed.offload_optimizer=true"]
    if lay.activation_checkpointing:
        out.append("model.activation_checkpointing=true")
    if lay.global_batch_tokens is not None or not gb["divisible"]:
        out.append(f"trainer.global_batch_tokens={gb['suggested_tokens'] if not gb['divisible'] else gb['tokens']}")
    if lay.dtype == "fp32":
        out.append("deepspeed.precision=fp32")
    return out


# --------------------------------------------------------------------------- --suggest
def step_cost(lay: Layout, p: dict) -> float:
    """Seconds per optimizer step, for ranking layouts only: compute at the given MFU (×4/3 with full
    recompute) plus communication that is assumed not to overlap (rough bandwidths at the top)."""
    gb, pc, w = p["batch"], p["params"], lay.w
    compute = p["flops"]["per_step"] / (lay.gpus * lay.peak_tflops * TERA * lay.mfu)
    if lay.activation_checkpointing:
        compute *= RECOMPUTE_COST
    micro_steps = gb["samples"] // (lay.micro_batch * lay.dp)
    cfg = lay.config()
    tp_bytes = 0.0
    if lay.tp > 1:  # a ring all-reduce moves 2·(t-1)/t of the tensor per GPU
        ar = 2 * (lay.tp - 1) / lay.tp * lay.seq_len * lay.micro_batch * cfg.d_model * w
        per_layer = TP_ALLREDUCES_PER_LAYER_RECOMPUTE if lay.activation_checkpointing else TP_ALLREDUCES_PER_LAYER
        tp_bytes = ar * cfg.n_layers * per_layer * micro_steps
    ring = (lay.dp - 1) / lay.dp if lay.dp > 1 else 0.0
    P = pc["per_tp_shard"]
    # DP traffic in units of the weights, per step: an all-reduce of the grads (2 ring passes) at stages
    # 0-1; a reduce-scatter per micro-step plus the weights' all-gather at stage 2; at stage 3 an
    # all-gather forward, one backward and a reduce-scatter, every micro-step.
    dp_bytes = ring * w * P * {0: 2, 1: 2, 2: micro_steps + 1, 3: 3 * micro_steps}[lay.zero]
    network_bw = NVLINK_BW if lay.nodes == 1 else NETWORK_BW
    offload = 0.0
    if lay.offload != "none":  # grads down, weights up over PCIe; plus the host's Adam step
        shard = P / (lay.dp if lay.zero >= 1 else 1)
        offload = (4 + w) * shard / PCIE_BW + shard / HOST_ADAM_PARAMS_PER_S
        if lay.offload == "param":
            offload += 2 * micro_steps * w * P / lay.dp / PCIE_BW
    return compute + tp_bytes / NVLINK_BW + dp_bytes / network_bw + offload


def suggest(base: Layout) -> list[tuple[float, Layout, dict]]:
    """Every layout of TP, ZeRO stage, offload, micro batch and recompute that fits, cheapest first.
    When the global batch does not split evenly, the layout uses the nearest batch that does."""
    found = []
    for tp in (t for t in SUGGEST_TP if _tp_fits(base, t)):
        for zero in (1, 2, 3):
            for offload in ("none", "optimizer", "param"):
                if offload == "param" and zero != 3:
                    continue
                for mb in SUGGEST_MICRO_BATCH:
                    for ac in (False, True):
                        lay = replace(base, tp=tp, zero=zero, offload=offload, micro_batch=mb,
                                      activation_checkpointing=ac)
                        gb = global_batch(lay)
                        if abs(gb["suggested_samples"] - gb["samples"]) > SUGGEST_MAX_BATCH_CHANGE * gb["samples"]:
                            continue  # the global batch would have to change too much
                        if not gb["divisible"]:
                            lay = replace(lay, global_batch_tokens=gb["suggested_tokens"])
                        p = plan(lay)
                        if p["fits"]:
                            found.append((step_cost(lay, p), lay, p))
    # Costs within SUGGEST_COST_TIE of each other tie; then the lower ZeRO stage and TP, and the larger
    # micro batch (the cost model ignores kernel efficiency, which grows with the micro batch) win.
    found.sort(key=lambda x: (round(math.log(x[0]) / math.log(SUGGEST_COST_TIE)), x[1].zero, x[1].tp,
                              -x[1].micro_batch))
    return found


def _tp_fits(lay: Layout, tp: int) -> bool:
    """Whether validate() would accept ``tp`` for this layout (the same two checks)."""
    try:
        check_topology(lay.gpus, tp, lay.gpus_per_node, gpus=True)
        lay.config().validate_tensor_parallel(tp)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- CLI
def _gib(x: float) -> str:
    return f"{x / GIB:9.2f} GiB"


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def render(p: dict) -> str:
    lay, pc, m = p["layout"], p["params"], p["memory_per_gpu"]
    act, buf, gb, t = m["activations"], m["buffers"], p["batch"], p["time"]
    offload = "" if lay["offload"] == "none" else f", offload {lay['offload']}"
    lines = [
        f"gal-plan: {lay['model']} on {lay['nodes']} node(s) × {lay['gpus_per_node']} GPU(s) of "
        f"{lay['gpu_memory_gib']:g} GiB — TP {lay['tp']} × DP {lay['dp']}, ZeRO-{lay['zero']}{offload}, {lay['dtype']}, "
        f"micro batch {lay['micro_batch']} × {lay['seq_len']} tokens"
        f"{', activation checkpointing' if lay['activation_checkpointing'] else ''}, {lay['attention']} attention",
        f"parameters        {_count(pc['total'])} total, {_count(pc['per_tp_shard'])} per TP shard, "
        f"largest layer {_count(pc['largest_layer'])}",
        "memory per GPU",
    ]
    for k, v in m["model_states"].items():
        if v:
            lines.append(f"  {k:<22}{_gib(v)}")
    lines.append(f"  = model states        {_gib(m['model_states_total'])}")
    lines.append(f"  activations           {_gib(act['total'])}  (layers {act['layers'] / GIB:.2f}, "
                 f"logits {act['logits'] / GIB:.2f}, final norm {act['final_norm'] / GIB:.2f})")
    lines.append(f"  buffers               {_gib(buf['total'])}  (reduce bucket {buf['reduce_bucket'] / GIB:.2f}, "
                 f"prefetch {buf['prefetch_bucket'] / GIB:.2f}, CUDA context {buf['cuda_context'] / GIB:.2f})")
    lines.append(f"  total                 {_gib(m['total'])}  of {_gib(m['usable']).strip()} usable "
                 f"({lay['headroom']:.0%} headroom)")
    if p["host_per_node"]["offloaded_states"]:
        lines.append(f"host memory per node  {_gib(p['host_per_node']['offloaded_states'])}  offloaded states")
    verdict = "FITS" if p["fits"] else ("DOES NOT FIT (GPU)" if not p["fits_gpu"] else "DOES NOT FIT (host memory)")
    lines.append(f"verdict               {verdict}")
    batch = (f"{gb['samples']} sequences = {gb['samples'] * lay['seq_len']:,} tokens, gradient accumulation "
             f"{gb['grad_accum']}" if gb["divisible"] else
             f"{gb['samples']} sequences do not split over micro batch × DP = {lay['micro_batch'] * lay['dp']}; "
             f"use --global-batch-tokens {gb['suggested_tokens']}")
    lines += [
        f"global batch          {batch}",
        f"FLOPs                 {p['flops']['per_token']:.3e} per token, {p['flops']['per_step']:.3e} per step, "
        f"{p['flops']['total']:.3e} in all",
        f"time for {lay['tokens']:.3g} tokens at {lay['mfu']:.0%} MFU of {lay['peak_tflops']:g} TFLOP/s: "
        f"{t['days']:.1f} days ({t['steps']:,.0f} steps of {t['step_seconds']:.2f} s, {t['gpu_hours']:,.0f} GPU-hours)",
        "gal-train overrides   " + " ".join(p["overrides"]),
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="gal-plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Memory per GPU (model states, activations, buffers), fit, FLOPs and time to train for a "
                    "Galactica size on a cluster layout; --suggest finds the cheapest layout that fits.",
        epilog="Example: gal-plan --model 120b --nodes 128 --suggest")
    d = Layout()
    ap.add_argument("--model", default=d.model, choices=SIZE_NAMES, help="model size (conf/model/<size>.yaml)")
    ap.add_argument("--vocab-size", type=int, default=d.vocab_size, help="tokenizer vocabulary")
    ap.add_argument("--nodes", type=int, default=d.nodes, help="nodes")
    ap.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="GPUs per node")
    ap.add_argument("--gpu-memory-gib", type=float, default=d.gpu_memory_gib, help="memory of one GPU")
    ap.add_argument("--cpu-memory-gib", type=float, default=d.cpu_memory_gib, help="host memory per node (offload)")
    ap.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel size (within a node)")
    ap.add_argument("--zero", type=int, default=d.zero, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    ap.add_argument("--offload", default=d.offload, choices=("none", "optimizer", "param"),
                    help="CPU offload of the optimizer states, or also of the weights (ZeRO-3 only)")
    ap.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per GPU per micro-step")
    ap.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    ap.add_argument("--activation-checkpointing", action="store_true", help="full recompute, one checkpoint per block")
    ap.add_argument("--dtype", default=d.dtype, choices=("bf16", "fp32"), help="bf16 (GPU) or fp32 (the CPU path)")
    ap.add_argument("--attention", default=d.attention, choices=("flash", "math"),
                    help="flash: SDPA's flash kernels keep no s×s scores (GPU); math: they are stored (CPU with dropout)")
    ap.add_argument("--global-batch-tokens", type=int, default=None,
                    help="tokens per optimizer step (default: the size's Table-5 batch, conf/model/<size>.yaml)")
    ap.add_argument("--tokens", type=float, default=d.tokens, help="tokens to train")
    ap.add_argument("--mfu", type=float, default=d.mfu, help="assumed model FLOPs utilization")
    ap.add_argument("--peak-tflops", type=float, default=d.peak_tflops, help="dense bf16 peak per GPU (H100 SXM: 989)")
    ap.add_argument("--headroom", type=float, default=d.headroom, help="GPU memory fraction kept free for fragmentation")
    ap.add_argument("--suggest", action="store_true",
                    help="search TP, ZeRO stage, offload, micro batch and recompute for the cheapest fitting layout")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k not in ("suggest", "json")}
    lay = Layout(**fields)
    try:
        validate(lay)
        if args.suggest:
            found = suggest(lay)
            if not found:
                raise ConfigError(f"--suggest: no layout of {lay.model} fits {lay.nodes} node(s) × {lay.gpus_per_node} "
                                f"GPU(s) of {lay.gpu_memory_gib:g} GiB; add --nodes or GPU memory")
            cost, best, p = found[0]
            p["step_cost_seconds"] = cost
            p["alternatives"] = [{"cost_seconds": c, "tp": l.tp, "zero": l.zero, "offload": l.offload,
                                  "micro_batch": l.micro_batch, "activation_checkpointing": l.activation_checkpointing}
                                 for c, l, _ in found[1:6]]
        else:
            p = plan(lay)
    except ConfigError as e:
        fail("gal-plan", str(e))
    if args.json:
        print(json.dumps(p, indent=2))
    else:
        print(render(p))
        if args.suggest:
            print(f"suggested (ranked by an estimated {p['step_cost_seconds']:.2f} s/step incl. communication; "
                  f"next: " + "; ".join(f"TP {a['tp']} ZeRO-{a['zero']} mb {a['micro_batch']}"
                                        f"{' AC' if a['activation_checkpointing'] else ''}"
                                        f"{' offload ' + a['offload'] if a['offload'] != 'none' else ''}"
                                        for a in p["alternatives"][:3]) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
