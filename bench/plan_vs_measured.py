"""gal-plan's memory estimate against the measured peak memory of real CPU training runs.

    .venv/bin/python bench/plan_vs_measured.py [--sizes tiny 125m] [--zero 2 3] [--seq-len 512] [--steps 3]

Each case trains with the real gal-train (DeepSpeed ZeRO on 1 CPU rank, fp32, dropout 0.1 as in the
paper, so SDPA uses its math path: ``--attention math``) on synthetic shards with the 50k vocabulary,
one sequence per step, for a few steps, and takes the process's peak resident memory (``ru_maxrss``
from ``os.wait4``). Measured = peak RSS minus the peak RSS of a process that only imports the
trainer's modules (torch, DeepSpeed, megatron-core, ...). gal-plan's estimate for the same layout is
model states + activations + the part of DeepSpeed's reduce bucket that gradients fill (a CPU process's
RSS counts only touched pages of the 5e8-element bucket; there is no CUDA context). A bench, not a test:
docs/plan.md holds a recorded run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch import plan as gp  # noqa: E402
from pretrain.data.shards import ShardWriter  # noqa: E402

MIB = 2**20


def make_shards(root: Path, seq_len: int, n: int = 16, vocab: int = 50000) -> Path:
    rng = np.random.default_rng(0)
    w = ShardWriter(root / "train" / "syn", seq_len + 1, np.uint16, samples_per_shard=n)
    for i in range(n):
        w.write(rng.integers(4, vocab, seq_len + 1).astype(np.uint16),
                {"doc_ids": [f"d{i}"], "sources": ["syn"], "doc_starts": [0], "pad_tokens": 0})
    w.close()
    (root / "manifest.json").write_text(json.dumps({"vocab_size": vocab, "pad_id": 1}))
    return root


def peak_rss(cmd: list[str], env: dict) -> tuple[int, float, str]:
    """(peak resident bytes of the process, seconds, output tail)."""
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        tail = out.read()[-3000:]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return usage.ru_maxrss * 1024, time.time() - t0, tail  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "125m"])
    ap.add_argument("--zero", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--seq-len", nargs="+", type=int, default=[512])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    baseline, _, _ = peak_rss([sys.executable, "-c", "import pretrain.train, deepspeed, megatron.core"], env)
    print(f"baseline (imports only): {baseline / MIB:.0f} MiB")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq in args.seq_len:
            shards = make_shards(Path(tmp) / f"shards{seq}", seq)
            for size in args.sizes:
                for zero in args.zero:
                    run_dir = Path(tmp) / f"run_{size}_{zero}_{seq}"
                    cmd = [sys.executable, "-m", "pretrain.train", f"model={size}", f"data.path={shards}",
                           f"run_dir={run_dir}", f"deepspeed=zero{zero}", "trainer.device=cpu",
                           "trainer.micro_batch_size=1", f"trainer.global_batch_tokens={seq}",
                           f"trainer.max_tokens={args.steps * seq}", "optim.warmup_tokens=1000",
                           "validation.enabled=false", "validation.probes=false", "logger=none", "logger.console=false"]
                    peak, secs, _ = peak_rss(cmd, env)
                    lay = gp.Layout(model=size, nodes=1, gpus_per_node=1, zero=zero, micro_batch=1, seq_len=seq,
                                    dtype="fp32", attention="math", global_batch_tokens=seq)
                    ms, act = gp.model_states(lay), gp.activations(lay)
                    buf = gp.buffers(lay, touched_only=True)
                    estimate = ms["gpu_total"] + ms["host_total"] + act["total"] + buf["total"]
                    measured = peak - baseline
                    row = {"size": size, "zero": zero, "seq_len": seq, "params": gp.param_counts(lay.config())["total"],
                           "model_states_mib": ms["gpu_total"] / MIB, "activations_mib": act["total"] / MIB,
                           "buffers_mib": buf["total"] / MIB, "estimate_mib": estimate / MIB,
                           "peak_rss_mib": peak / MIB, "baseline_mib": baseline / MIB, "measured_mib": measured / MIB,
                           "ratio_measured_over_estimate": measured / estimate, "seconds": secs}
                    rows.append(row)
                    print(f"{size:>5} ZeRO-{zero} seq {seq}: estimate {estimate / MIB:7.0f} MiB "
                          f"(states {ms['gpu_total'] / MIB:.0f}, activations {act['total'] / MIB:.0f}, "
                          f"bucket {buf['total'] / MIB:.0f}); measured {measured / MIB:7.0f} MiB "
                          f"(peak RSS {peak / MIB:.0f} - baseline {baseline / MIB:.0f}); "
                          f"ratio {measured / estimate:.2f}; {secs:.0f} s", flush=True)
    header = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "command": " ".join(sys.argv)}
    if args.json:
        args.json.write_text(json.dumps({**header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
