"""What only a GPU can show, checked in one go on one H100/H200 (at most ~8 minutes), into one JSON.

    bench/gpu_check.sh [--out FILE]      on a GPU machine (default FILE: bench/results/gpu_check.json)
    bench/gpu_check.sh --dry-run         the same code on the CPU at tiny sizes (tests/test_gpu_check.py)

Checks, each a key of the JSON with ``ok`` true or false:

* ``engine_steps``: the DeepSpeed engine step (ZeRO-2, bf16, flash SDPA) of the 125m and 1.3b shapes at
  seq 2048 (bench/gpu_mfu.py's ``run_one``): tokens/s, TFLOP/s, MFU against the card's dense bf16
  datasheet peak, and the peak memory against gal-plan's estimate for the same layout (launch/plan.py).
* ``nan_guard``: a real gal-train run in bf16 with a NaN loss injected at step 3 skips that update
  and trains on.
* ``kill_resume``: the same run SIGKILLed after step 5 (``GAL_FAULT_KILL``) and resumed gives the
  uninterrupted run's losses bit for bit.
* ``export``: gal-export of the finished run; transformers' fp32 logits against the engine's bf16
  logits on the same ids (tolerance: 5% of the largest logit, bf16's rounding over a few layers).

Without a GPU it exits with 2 and says so, having measured nothing, unless ``--dry-run``: then the
checks run on the CPU (bf16 through DeepSpeed's CPU accelerator, the tiny model, a few steps) so
that the script itself is tested on every CI run. Exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# (model size, seq len, micro batch) of the engine steps; the GPU's micro batches are gpu_mfu's first tries
ENGINE_SHAPES = {"gpu": [("125m", 2048, 16), ("1.3b", 2048, 8)], "dry": [("tiny", 128, 2)]}
# the gal-train runs: the tiny model on the built-in sample (a bigger model adds no check)
TRAIN = ["model=tiny-2l", "deepspeed=zero2", "deepspeed.precision=bf16", "trainer.global_batch_tokens=1024",
         "optim.warmup_tokens=1024", "trainer.max_tokens=8192", "checkpoint.interval_tokens=2048",
         "trainer.inject_nan_at_steps=[3]", "validation.at_start=false", "logger.wandb=false"]
KILL_AFTER = 5  # of the 8 steps; the checkpoint before it is step 4
EXPORT_TOLERANCE = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="run every check on the CPU at tiny sizes")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    p.add_argument("--data", type=Path, help="gal-prepare output to train on (default: prepare the built-in sample)")
    p.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], *, env: dict | None = None, expect: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", **(env or {})})
    if proc.returncode != expect:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... exited {proc.returncode}, expected {expect}:\n"
                           f"{proc.stderr[-3000:]}")
    return proc


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float | None]]:
    return [(r["step"], r["loss"]) for r in rows(run_dir) if "event" not in r]


# ---------------------------------------------------------------- engine steps (in this process)
def engine_steps(device, dry: bool) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_mfu import run_one

    from launch import plan as gal_plan

    args = argparse.Namespace(vocab=50000 if not dry else 1000, grad_accum=1, warmup=2 if not dry else 1,
                              steps=8 if not dry else 2, zero_stage=2, peak_tflops=None)
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 80.0
    results = []
    for size, seq_len, micro_batch in ENGINE_SHAPES["dry" if dry else "gpu"]:
        args.seq_len = seq_len
        log(f"engine step: {size}, seq {seq_len}, micro batch {micro_batch}, bf16, ZeRO-2")
        r = run_one(size, "engine", micro_batch, args, device=device)
        layout = gal_plan.Layout(model=size, vocab_size=args.vocab, nodes=1, gpus_per_node=1, gpu_memory_gib=memory,
                                 zero=2, micro_batch=micro_batch, seq_len=seq_len, dtype="bf16", attention="flash")
        estimate = gal_plan.plan(layout)["memory_per_gpu"]["total"] / 2**30
        r["plan_memory_gib"] = estimate
        r["memory_vs_plan"] = r["max_memory_gib"] / estimate if r["max_memory_gib"] is not None else None
        results.append(r)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        log(f"  {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}% ({r['peak_source']}), memory "
            f"{r['max_memory_gib'] if r['max_memory_gib'] is None else round(r['max_memory_gib'], 2)} GiB "
            f"(gal-plan {estimate:.2f} GiB)")
    finite = all(r["last_loss"] == r["last_loss"] and r["last_loss"] < r["first_loss"] + 1 for r in results)
    return {"ok": finite, "results": results}


# ---------------------------------------------------------------- gal-train, gal-export (subprocesses)
def prepare(work: Path, dry: bool) -> Path:
    out = work / "shards"
    log(f"gal-prepare: the built-in sample into {out}")
    small = ["max_docs_per_file=120", "tokenizer.vocab_size=1000"] if dry else []
    run([str(BIN / "gal-prepare"), "shards.seq_len=256", f"output={out}", f"hydra.run.dir={work}/prepare", *small])
    return out


def train(run_dir: Path, data: Path, device: str, *extra: str, env: dict | None = None, expect: int = 0):
    return run([sys.executable, "-m", "pretrain.train", f"data.path={data}", f"run_dir={run_dir}",
                f"trainer.device={device}", *TRAIN, *extra], env=env, expect=expect)


def nan_guard(straight: Path) -> dict:
    r = losses(straight)
    start = next(x for x in rows(straight) if x.get("event") == "start")
    step3 = next(x for x in rows(straight) if x.get("step") == 3 and "event" not in x)
    ok = (start["precision"] == "bf16" and step3.get("skipped") == "non-finite loss"
          and all(loss is not None and loss == loss for step, loss in r if step != 3))
    return {"ok": ok, "precision": start["precision"], "step3": step3.get("skipped"), "losses": r}


def kill_resume(work: Path, data: Path, device: str, straight: Path) -> dict:
    run_dir = work / "killed"
    log(f"kill/resume: SIGKILL after step {KILL_AFTER}, then resume=auto")
    train(run_dir, data, device, env={"GAL_FAULT_KILL": f"step:{KILL_AFTER}"}, expect=-9)
    train(run_dir, data, device)
    want, got = losses(straight), losses(run_dir)
    same = [a == b for a, b in zip(want, got)]
    diffs = [abs(a[1] - b[1]) for a, b in zip(want, got) if a[1] is not None and b[1] is not None]
    resumed = [x["step"] for x in rows(run_dir) if x.get("event") == "start" and x["resumed"]]
    return {"ok": len(got) == len(want) and all(same) and bool(resumed), "bit_identical_steps": sum(same),
            "steps": len(want), "resumed_at": resumed, "max_abs_loss_diff": max(diffs, default=None)}


def export(work: Path, straight: Path, device: str) -> dict:
    import torch
    from transformers import OPTForCausalLM

    hf = work / "hf"
    log(f"gal-export {straight} -> {hf}")
    run([str(BIN / "gal-export"), str(straight), str(hf)])
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "ids.pt")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
         str(REPO / "tests" / "dist" / "export_engine_logits.py"), str(straight), str(work / "ids.pt"),
         str(work / "engine_logits.pt")])
    engine = torch.load(work / "engine_logits.pt").float().cpu()
    model = OPTForCausalLM.from_pretrained(hf, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        logits = model(ids.to(device)).logits.float().cpu()
    err, scale = (logits - engine).abs().max().item(), logits.abs().max().item()
    return {"ok": err < EXPORT_TOLERANCE * scale, "max_abs_err": err, "max_abs_logit": scale,
            "tolerance": f"{EXPORT_TOLERANCE} x max |logit|", "engine_dtype": "bf16"}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        print(f"bench/gpu_check.sh needs a CUDA GPU (H100/H200): torch.cuda.is_available() is False (torch "
              f"{torch.__version__}, CUDA build: {torch.version.cuda}). Nothing was checked; --dry-run runs the "
              "same checks on the CPU at tiny sizes.", file=sys.stderr)
        return 2
    dry = args.dry_run
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    os.environ.setdefault("LOCAL_RANK", "0")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from model import parallel

    parallel.init_distributed(1)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": dry, "device": torch.cuda.get_device_name(0) if not dry else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "checks": {}}
    checks = report["checks"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        checks["engine_steps"] = attempt(lambda: engine_steps(device, dry))
        data = args.data or prepare(work, dry)
        straight = work / "straight"
        log(f"gal-train in bf16 on {device.type}, a NaN loss injected at step 3")
        trained = attempt(lambda: {"ok": train(straight, data, device.type).returncode == 0})
        if trained["ok"]:
            checks["nan_guard"] = attempt(lambda: nan_guard(straight))
            checks["kill_resume"] = attempt(lambda: kill_resume(work, data, device.type, straight))
            checks["export"] = attempt(lambda: export(work, straight, device.type))
        else:
            checks["nan_guard"] = checks["kill_resume"] = checks["export"] = trained
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(c["ok"] for c in checks.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, c in checks.items():
        log(f"{name}: {'ok' if c['ok'] else 'FAILED'}" + (f" ({c['error'].splitlines()[0]})" if "error" in c else ""))
    log(f"{report['seconds']} s; {args.out}")
    return 0 if report["ok"] else 1


def attempt(check) -> dict:
    """A check's result, or {"ok": False, "error": ...}: one failing check does not hide the others."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 (any failure is that check's result)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    sys.exit(main())
