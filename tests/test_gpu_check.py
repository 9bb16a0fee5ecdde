"""bench/gpu_check.sh: without a GPU it says so and measures nothing; ``--dry-run`` runs every one of its
checks (bf16 engine steps, the NaN guard, kill/resume, export) through the same code on the CPU."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from helpers import REPO, train_env

SCRIPT = REPO / "bench" / "gpu_check.sh"


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**train_env(), "PY": sys.executable})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would measure it")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = gpu_check("--out", str(out))
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("bench/gpu_check.sh needs a CUDA GPU (H100/H200)") and "--dry-run" in line
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.trainer
def test_dry_run_passes_every_check_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = gpu_check("--dry-run", "--out", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["ok"] is True
    checks = report["checks"]
    assert set(checks) == {"engine_steps", "nan_guard", "kill_resume", "export"}
    (step,) = checks["engine_steps"]["results"]
    assert step["size"] == "tiny" and step["mode"] == "engine" and step["tokens_per_s"] > 0 and 0 < step["mfu"] < 1
    assert step["plan_memory_gib"] > 0 and step["max_memory_gib"] is None  # the CPU has no CUDA allocator
    assert checks["nan_guard"]["precision"] == "bf16" and checks["nan_guard"]["step3"] == "non-finite loss"
    kill = checks["kill_resume"]
    assert kill["bit_identical_steps"] == kill["steps"] == 8 and kill["resumed_at"] == [4]
    assert checks["export"]["max_abs_err"] < 0.05 * checks["export"]["max_abs_logit"]
