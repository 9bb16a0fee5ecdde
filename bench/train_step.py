"""Tokens/s of the full training step (DeepSpeed ZeRO-2 engine + EpochLoader over real shards) on 1
and 2 ranks, in fp32 and in DeepSpeed's bf16 mode, against the plain-PyTorch reference step in the same
precision, and the loader's throughput against the step's demand.

    .venv/bin/python bench/train_step.py [--data SHARDS] [--layers 2 --d-model 512 --heads 8
        --vocab 16000 --micro-batch 4 --global-batch 8 --warmup 1 --steps 3 --repeats 2
        --precisions fp32,bf16]

* Shards: ``--data`` (a gal-prepare output, e.g. ``gal-prepare shards.seq_len=512 output=DIR``); by
  default the script runs ``gal-prepare`` on the built-in sample into a temporary directory.
* Engine step: ``loader.next_global_batch()`` (the time spent waiting on it is reported too), then the
  production step ``pretrain.trainer.step.train_step`` (forward/backward per micro-batch, the one
  all-reduce of loss and preemption flag, the loss guard), on the engine built by the trainer's own
  ``pretrain.trainer.setup.build_engine``. GalacticaLM (megatron-core layers, TP=1), ZeRO stage 2,
  ``deepspeed.precision`` fp32 or bf16 (bf16 weights and activations, fp32 master weights and AdamW
  states), clipping 1.0, DeepSpeed's torch AdamW. The global batch is fixed in samples, so grad
  accumulation = global / (micro × ranks), as gal-train derives it.
* Reference step: the plain nanoGPT-style model of bench/model_step.py, ``torch.optim.AdamW``
  (``--ref-adamw fused|foreach``), the same loss/accum backward per micro-batch and
  ``clip_grad_norm_(1.0)``, on batches read from the same shards beforehand (compute only); in bf16 the
  model is ``.to(torch.bfloat16)`` (the engine's forward and backward precision; no fp32 master copy).
* 1 rank: one process, 2 threads (``--threads``), the reference step interleaved round-robin with the
  engine step (rotating order). 2 ranks: ``torch.distributed.run --nproc-per-node=2`` over gloo,
  OMP_NUM_THREADS=1 each. The 1- and 2-rank runs alternate ``--repeats`` times (rotating order) so
  load from other jobs on a shared machine hits both; tokens/s come from the median step.
* Loader: an EpochLoader (prefetch on, ShardReader through the index) drained with no model work:
  samples/s and tokens/s it delivers, divided by the tokens/s the engine step consumes per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="gal-prepare output dir (manifest.json, train/<source>/); default: prepare the sample")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16000, help="model vocabulary (>= the shards' tokenizer)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per micro-step")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step (all ranks)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--repeats", type=int, default=2, help="alternating launches of the 1- and 2-rank runs")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the 1-rank run")
    p.add_argument("--ref-adamw", choices=("fused", "foreach"), default="fused")
    p.add_argument("--loader-batches", type=int, default=200, help="global batches drained for the loader test")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)  # the worker's
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- worker (one rank)
def worker(args) -> None:
    import logging

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from model_step import RefLM  # the plain-PyTorch reference model of the model benchmark

    from model import parallel
    from model.config import GalacticaConfig
    from pretrain.config import TrainConfig
    from pretrain.data.loader import EpochLoader
    from pretrain.data.shards import TrainSplit
    from pretrain.trainer import engine as ds_engine
    from pretrain.trainer.faults import Drills
    from pretrain.trainer.guards import LossGuard, Preemption, TrainState
    from pretrain.trainer.setup import Shapes, build_engine
    from pretrain.trainer.step import train_step

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LOCAL_RANK", "0")
    parallel.init_distributed(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = Path(args.data)
    manifest = json.loads((data / "manifest.json").read_text())
    if args.vocab < manifest["vocab_size"]:
        raise SystemExit(f"--vocab {args.vocab} is below the shards' tokenizer vocabulary {manifest['vocab_size']}")
    samples = TrainSplit(data)
    seq_len = samples.sample_len - 1
    mb, gbs = args.micro_batch, args.global_batch
    if gbs % (mb * world):
        raise SystemExit(f"--global-batch {gbs} is not divisible by --micro-batch {mb} × {world} ranks")
    accum = gbs // (mb * world)

    cfg = TrainConfig(run_dir="unused", seed=0)
    cfg.deepspeed.zero_stage, cfg.deepspeed.precision = 2, args.precision
    cfg.optim.warmup_tokens = 0
    cfg.trainer.micro_batch_size = mb
    model_cfg = GalacticaConfig(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                                vocab_size=args.vocab, dropout=0.0, attention_dropout=0.0, max_positions=max(2048, seq_len))
    shapes = Shapes(seq_len=seq_len, num_samples=len(samples), global_batch=gbs, grad_accum=accum, total_steps=10_000)
    device = torch.device("cpu")
    engine, _ = build_engine(cfg, model_cfg, shapes, device)
    state = TrainState()
    guard, preemption, drills = LossGuard(cfg.trainer, state), Preemption(), Drills()
    loader = EpochLoader(samples, micro_batch_size=mb, global_batch_size=gbs, dp_rank=parallel.dp_rank(),
                         dp_size=parallel.dp_size(), seed=1234, pad_id=manifest["pad_id"], prefetch=4)
    times: dict[str, list[float]] = {"engine": [], "data_wait": [], "ref": []}
    losses: dict[str, list[float]] = {"engine": [], "ref": []}

    def engine_step() -> None:
        dist.barrier()
        start = time.perf_counter()
        batches = loader.next_global_batch()
        got = time.perf_counter()
        state.step += 1
        result = train_step(engine, batches, device, step=state.step, guard=guard, preemption=preemption,
                            drills=drills)
        losses["engine"].append(result.loss)
        times["engine"].append(time.perf_counter() - start)
        times["data_wait"].append(got - start)

    steps = [("engine", engine_step)]
    if world == 1:
        torch.manual_seed(0)
        ref = RefLM(args.layers, args.d_model, args.heads, args.vocab, max_positions=max(2048, seq_len))
        if args.precision == "bf16":
            ref.to(torch.bfloat16)
        opt = torch.optim.AdamW(ds_engine.param_groups(ref, cfg.optim.weight_decay), lr=cfg.optim.lr_max,
                                betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                **{args.ref_adamw: True})
        ref_loader = EpochLoader(samples, micro_batch_size=mb, global_batch_size=gbs, seed=99, prefetch=0)
        ref_batches = ref_loader.next_global_batch()

        def ref_step() -> None:
            start = time.perf_counter()
            micro = []
            for batch in ref_batches:
                loss = ref(batch.input_ids, batch.labels)
                micro.append(loss.detach())
                (loss / len(ref_batches)).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses["ref"].append(torch.stack(micro).mean().item())
            times["ref"].append(time.perf_counter() - start)

        steps.append(("ref", ref_step))

    for round_ in range(args.warmup + args.steps):
        shift = round_ % len(steps)
        for name, fn in steps[shift:] + steps[:shift]:
            fn()
            if rank == 0:
                print(f"    [{world} rank{'s' if world > 1 else ''}, {args.precision}] round {round_} {name:6s} "
                      f"{times[name][-1]:6.2f} s  loss {losses[name][-1]:.4f}", flush=True)
    loader.close()
    result = {"world": world, "precision": args.precision, "threads": args.threads, "accum": accum, "seq_len": seq_len,
              "tokens_per_step": gbs * seq_len, "times": {k: v[args.warmup:] for k, v in times.items()},
              "losses": losses}

    if world == 1:  # the loader alone: how fast can it hand out global batches?
        fresh = EpochLoader(samples, micro_batch_size=mb, global_batch_size=gbs, seed=7,
                            pad_id=manifest["pad_id"], prefetch=4)
        fresh.next_global_batch()  # starts the prefetch thread
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            fresh.next_global_batch()
        elapsed = time.perf_counter() - start
        fresh.close()
        result["loader"] = {"samples_per_s": args.loader_batches * gbs / elapsed,
                            "tokens_per_s": args.loader_batches * gbs * seq_len / elapsed,
                            "global_batches": args.loader_batches, "num_samples": len(samples)}
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- driver
def launch(args, ranks: int, precision: str) -> dict:
    threads = args.threads if ranks == 1 else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--data", str(args.data),
           "--precision", precision]
    for flag in ("layers", "d_model", "heads", "vocab", "micro_batch", "global_batch", "warmup", "steps",
                 "ref_adamw", "loader_batches"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    result = None
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO)
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
            elif line.startswith("    ["):
                print(line, end="", flush=True)
        if proc.wait() != 0 or result is None:
            err.seek(0)
            sys.exit(f"{ranks}-rank worker failed (exit {proc.returncode}):\n{err.read()[-4000:]}")
    return result


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="train_step_bench_")
        args.data = Path(tmp.name) / "shards"
        print(f"preparing the built-in sample (seq_len 512) into {args.data} ...", flush=True)
        prep = subprocess.run([str(Path(sys.executable).with_name("gal-prepare")), "shards.seq_len=512",
                               f"output={args.data}", f"hydra.run.dir={tmp.name}/hydra"],
                              cwd=REPO, capture_output=True, text=True)
        if prep.returncode:
            sys.exit(f"gal-prepare failed (exit {prep.returncode}):\n{prep.stderr[-4000:]}")
    precisions = args.precisions.split(",")
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}; "
          f"micro batch {args.micro_batch}, global batch {args.global_batch} sequences; {', '.join(precisions)}; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    layouts = [(ranks, p) for p in precisions for ranks in (1, 2)]
    runs: dict[tuple[int, str], list[dict]] = {layout: [] for layout in layouts}
    loads = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        for ranks, p in (layouts if rep % 2 == 0 else layouts[::-1]):
            print(f"  launch: {ranks} rank(s), {p}, repeat {rep}", flush=True)
            runs[ranks, p].append(launch(args, ranks, p))
            loads.append(os.getloadavg()[0])

    def median_step(layout: tuple[int, str], kind: str) -> float:
        return statistics.median(t for r in runs[layout] for t in r["times"][kind])

    seq_len = runs[layouts[0]][0]["seq_len"]
    tokens = args.global_batch * seq_len
    print(f"\n{tokens} tokens per optimizer step (global batch {args.global_batch} × seq {seq_len}); "
          f"load average during the runs {min(loads):.2f} - {max(loads):.2f}")
    print(f"{'step':44s} {'prec':>5s} {'ranks':>5s} {'thr/rank':>8s} {'accum':>5s} {'best s':>7s} {'median s':>9s} "
          f"{'tokens/s':>9s} {'vs plain':>8s}")
    engine_tps = {}
    for p in precisions:
        ref_s = median_step((1, p), "ref")
        rows = [(f"plain PyTorch reference (AdamW {args.ref_adamw} + clip)", 1, args.threads, "ref", ref_s),
                ("DeepSpeed ZeRO-2 engine + EpochLoader", 1, args.threads, "engine", median_step((1, p), "engine")),
                ("DeepSpeed ZeRO-2 engine + EpochLoader", 2, 1, "engine", median_step((2, p), "engine"))]
        for name, ranks, threads, kind, step_s in rows:
            tps = tokens / step_s
            if kind == "engine":
                engine_tps[ranks, p] = tps
            best = min(t for r in runs[ranks, p] for t in r["times"][kind])
            accum = runs[ranks, p][0]["accum"]
            print(f"{name:44s} {p:>5s} {ranks:5d} {threads:8d} {accum:5d} {best:7.2f} {step_s:9.2f} {tps:9.1f} "
                  f"{ref_s / step_s:7.2f}x")
    for p in precisions:
        # The 1-rank engine and reference steps alternate in one process: the ratio of each adjacent pair
        # cancels slow load drift better than the ratio of the medians.
        paired = [t_ref / t_eng for r in runs[1, p] for t_eng, t_ref in zip(r["times"]["engine"], r["times"]["ref"])]
        print(f"{p}: engine vs plain, 1 rank, median of {len(paired)} paired steps: {statistics.median(paired):.2f}x "
              f"(range {min(paired):.2f} - {max(paired):.2f}); 2 ranks vs 1 rank (engine): "
              f"{engine_tps[2, p] / engine_tps[1, p]:.2f}x")
        for ranks in (1, 2):
            print(f"  data wait inside the engine step ({ranks} rank(s)): median "
                  f"{1e3 * median_step((ranks, p), 'data_wait'):.2f} ms")
    if {"fp32", "bf16"} <= set(precisions):
        print("engine step, bf16 vs fp32: " + ", ".join(
            f"{ranks} rank(s) {engine_tps[ranks, 'bf16'] / engine_tps[ranks, 'fp32']:.2f}x" for ranks in (1, 2)))

    loader = [r["loader"] for layout in layouts if layout[0] == 1 for r in runs[layout]]
    samples_s = statistics.median(x["samples_per_s"] for x in loader)
    tokens_s = statistics.median(x["tokens_per_s"] for x in loader)
    print(f"\nEpochLoader alone (prefetch 4, ShardReader via index, {loader[0]['num_samples']} samples, "
          f"{args.threads} threads): {samples_s:.0f} samples/s, {tokens_s:.0f} tokens/s")
    for (ranks, p), tps in engine_tps.items():
        demand = tps / ranks  # each rank's loader feeds its own slice
        print(f"  vs demand of the {ranks}-rank {p} engine step ({demand:.1f} tokens/s per rank): "
              f"{tokens_s / demand:.0f}x faster than needed")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
