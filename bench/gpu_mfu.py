"""MFU of GalacticaLM training steps on one GPU (H100 / H200): bf16, flash SDPA, fused AdamW.

    .venv/bin/python bench/gpu_mfu.py                      # 125m and 1.3b, seq 2048, plain PyTorch step
    .venv/bin/python bench/gpu_mfu.py --engine             # ... and through the DeepSpeed engine (ZeRO-2, bf16)
    .venv/bin/python bench/gpu_mfu.py --sizes 1.3b --micro-batch 1.3b=8 --steps 20

Step ("plain"): forward + backward under ``torch.autocast(cuda, bf16)`` with fp32 weights, gradients
and AdamW states (mixed precision: the matmuls and attention run in bf16, the master weights stay
fp32, as in DeepSpeed's bf16 mode), ``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)``
around forward and backward (it raises if flash cannot run), ``clip_grad_norm_(1.0)`` and
``torch.optim.AdamW(fused=True)``. We use autocast rather than ``model.to(torch.bfloat16)`` because
pure bf16 weights would lose small AdamW updates; ``--precision bf16`` measures that variant too.

Step ("engine", with ``--engine``): pretrain/trainer/engine.py's DeepSpeed engine, ZeRO stage 2, bf16
(DeepSpeed casts the module to bf16 and keeps fp32 master weights), torch AdamW with fused=True,
under the same flash SDPA context.

MFU = GalacticaLM.flops_per_token(seq) × tokens/s ÷ the card's dense bf16 peak
(pretrain/trainer/metrics.py: H100 SXM / H200 989 TFLOP/s, from torch.cuda.get_device_name). Megatron builds
the weights on the GPU when CUDA is available (model/transformer.py). If a micro batch runs out of
memory it is halved until one fits (the table says which one ran). Timings: CUDA-synchronized wall
time per optimizer step, median over ``--steps`` after ``--warmup``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MICRO_BATCH = {"125m": 16, "1.3b": 8}  # first try at seq 2048 on 80 GB; halved on OOM


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="125m,1.3b", help="comma-separated model.config sizes")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", action="append", default=[], metavar="SIZE=N",
                   help=f"first micro batch to try per size (default {DEFAULT_MICRO_BATCH}, others 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--vocab", type=int, default=50000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", choices=("autocast", "bf16"), default="autocast",
                   help="plain step: autocast (fp32 weights, bf16 compute) or model.to(bfloat16)")
    p.add_argument("--engine", action="store_true", help="also time the DeepSpeed engine step (ZeRO-2, bf16)")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for a GPU not in "
                   "pretrain/trainer/throughput.py DENSE_BF16_PEAK")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def micro_batches(args) -> dict[str, int]:
    out = dict(DEFAULT_MICRO_BATCH)
    for item in args.micro_batch:
        size, _, n = item.partition("=")
        if not n.isdigit():
            raise SystemExit(f"--micro-batch {item!r}: expected SIZE=N, e.g. 1.3b=8")
        out[size] = int(n)
    return out


def run_one(size: str, mode: str, micro_batch: int, args, device=None) -> dict:
    """One size and step kind on ``device`` (default: the first GPU; bench/gpu_check.py --dry-run passes the
    CPU, where flash attention does not exist and SDPA picks its own kernel)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model import GalacticaConfig, GalacticaLM, parallel
    from pretrain.trainer import engine as ds_engine
    from pretrain.config import TrainConfig, model_preset
    from pretrain.trainer.throughput import peak_flops

    device = device or torch.device("cuda", 0)
    cuda = device.type == "cuda"
    attention = (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)) if cuda else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    parallel.manual_seed(0)
    config = model_preset(size, vocab_size=args.vocab, dropout=0.0, attention_dropout=0.0)
    model = GalacticaLM(config).to(device)  # with CUDA megatron already builds every weight on the GPU
    flops_per_token = model.flops_per_token(args.seq_len)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, args.vocab, (micro_batch, args.seq_len + 1), device=device, generator=gen)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    if mode == "engine":
        cfg = TrainConfig(run_dir="unused")
        cfg.deepspeed.zero_stage, cfg.deepspeed.precision = args.zero_stage, "bf16"
        cfg.deepspeed.extra = {"optimizer": {"params": {"fused": True}}}  # passed through to torch AdamW
        engine, _, _ = ds_engine.build(cfg, model, micro_batch_size=micro_batch, grad_accum=args.grad_accum,
                                       tokens_per_step=micro_batch * args.grad_accum * args.seq_len,
                                       total_steps=10_000, device=device)

        def step() -> float:
            for _ in range(args.grad_accum):
                with attention():
                    loss = engine(inputs, labels)
                    engine.backward(loss)
                engine.step()
            return loss
    else:
        if mode == "bf16":
            model = model.to(torch.bfloat16)
        optimizer = torch.optim.AdamW(ds_engine.param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), fused=True)
        amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if mode == "autocast" else contextlib.nullcontext

        def step() -> float:
            for _ in range(args.grad_accum):
                with attention():
                    with amp():
                        loss = model(inputs, labels)
                    (loss / args.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    step_s = statistics.median(times[args.warmup:])
    tokens = micro_batch * args.grad_accum * args.seq_len
    tps = tokens / step_s
    peak, source = peak_flops(device, "bf16")
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    elif peak is None:
        sys.exit(f"{source}; pass --peak-tflops")
    return {"size": size, "mode": mode, "micro_batch": micro_batch, "grad_accum": args.grad_accum,
            "seq_len": args.seq_len, "params": model.num_parameters(),
            "step_s": step_s, "tokens_per_s": tps, "tflops": tps * flops_per_token / 1e12,
            "mfu": tps * flops_per_token / peak, "peak_tflops": peak / 1e12, "first_loss": losses[0],
            "last_loss": losses[-1], "peak_source": source,
            "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}


def main() -> None:
    args = parse_args()
    mbs = micro_batches(args)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_mfu.py needs a CUDA GPU (H100/H200): torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Nothing was measured.")
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("LOCAL_RANK", "0")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from model import parallel

    parallel.init_distributed(1)
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}; seq {args.seq_len}, "
          f"vocab {args.vocab}, grad accum {args.grad_accum}", flush=True)
    modes = [args.precision] + (["engine"] if args.engine else [])
    results = []
    for size in args.sizes.split(","):
        for mode in modes:
            mb = mbs.get(size, 4)
            while mb >= 1:
                try:
                    r = run_one(size, mode, mb, args)
                    break
                except torch.cuda.OutOfMemoryError:
                    print(f"  {size} {mode}: out of memory at micro batch {mb}; halving", flush=True)
                    mb //= 2
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            else:
                print(f"  {size} {mode}: does not fit even at micro batch 1", flush=True)
                continue
            results.append(r)
            print(f"  {size} {mode}: {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.0f} TFLOP/s, "
                  f"MFU {100 * r['mfu']:.1f}%, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}", flush=True)
    print(f"\nMFU against {name}'s dense bf16 peak ({results[0]['peak_tflops'] if results else 0:.0f} TFLOP/s)")
    print(f"{'size':6s} {'step':9s} {'params':>8s} {'micro':>5s} {'step s':>7s} {'tokens/s':>10s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'mem GiB':>8s}")
    for r in results:
        print(f"{r['size']:6s} {r['mode']:9s} {r['params'] / 1e6:7.0f}M {r['micro_batch']:5d} {r['step_s']:7.3f} "
              f"{r['tokens_per_s']:10,.0f} {r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {r['max_memory_gib']:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "results": results}, indent=1))


if __name__ == "__main__":
    main()
