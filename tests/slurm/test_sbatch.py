"""slurm/pretrain.sbatch on a real local Slurm cluster (the slurm_cluster fixture): data parallelism
over gloo across two nodes, and preemption → checkpoint → exit 75 → requeue → exact resume."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, synthetic_shards
from pretrain.analysis.records import read_metrics

pytestmark = pytest.mark.slurm

SBATCH = REPO / "slurm" / "pretrain.sbatch"
SEQ, N_SAMPLES = 128, 64
PAUSE = 3  # the ranks wait after this step for the signal; the run stops after the next one
STEPS = 40  # 4 samples (512 tokens) a step, 16 steps an epoch; dropout on, to test RNG restore
OVERRIDES = ["model=tiny-2l", "trainer.global_batch_tokens=512", f"trainer.max_tokens={512 * STEPS}",
             "optim.warmup_tokens=2048", "model.dropout=0.1", "model.attention_dropout=0.1",
             "validation.enabled=false", "logger.wandb=false", "logger.console=false"]
# two CPU nodes, one task each (the script's defaults are 8 tasks and 8 GPUs per node)
ON_CPUS = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--time=10"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("shards"), SEQ, N_SAMPLES, samples_per_shard=32)


def submit(cluster, run_dir: Path, shards: Path, **extra_env) -> str:
    env = {"RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "WANDB_MODE": "offline",
           **extra_env}
    return cluster.sbatch(*ON_CPUS, f"--output={run_dir}.out", str(SBATCH), f"data.path={shards}", *OVERRIDES,
                          env=env)


def rows(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows(run_dir) if "event" not in r]


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in rows(run_dir) if r.get("event") == name]


@pytest.fixture(scope="module")
def straight(slurm_cluster, shards, tmp_path_factory):
    """One uninterrupted 2-node run: (job, run_dir)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    job = slurm_cluster.wait(submit(slurm_cluster, run_dir, shards), timeout=600)
    return job, run_dir


def test_cluster_runs_a_two_node_step_with_the_repo_python(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch_wait("--nodes=2", "--ntasks-per-node=1", "--time=2", f"--output={out}",
                                    "--wrap=srun bash -c 'echo $SLURMD_NODENAME $(command -v python)'")
    assert (job.state, job.exit_code) == ("COMPLETED", 0), out.read_text()
    python = Path(sys.executable).parent / "python"
    assert sorted(out.read_text().splitlines()) == [f"node1 {python}", f"node2 {python}"]


@pytest.mark.trainer
@pytest.mark.multirank
@pytest.mark.slow
def test_two_nodes_train_data_parallel_over_gloo(straight):
    job, run_dir = straight
    log = Path(f"{run_dir}.out").read_text()
    assert (job.state, job.exit_code) == ("COMPLETED", 0), log[-5000:]
    assert job.fields["NodeList"] == "node[1-2]" and job.fields["NumNodes"] == "2"
    start = events(run_dir, "start")
    assert len(start) == 1
    assert {k: start[0][k] for k in ("world_size", "dp_size", "tp_size", "device", "resumed")} == \
        {"world_size": 2, "dp_size": 2, "tp_size": 1, "device": "cpu", "resumed": False}
    assert f"master 127.0.0.1:{20000 + int(job.id) % 20000}" in log  # node1's NodeAddr, the job's port
    assert [s for s, _ in losses(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir)[-1][1] < losses(run_dir)[0][1] - 1  # it learned something
    assert events(run_dir, "done")[0]["step"] == STEPS
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"
    assert (run_dir / "checkpoints" / f"step{STEPS:08d}").is_dir()


@pytest.mark.trainer
@pytest.mark.multirank
@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_with_the_same_losses(slurm_cluster, shards, straight, tmp_path):
    run_dir = tmp_path / "run"
    # every rank waits after step 3 until the signal arrives (GAL_FAULT_PAUSE, pretrain/trainer/faults.py), so the
    # stop step is known however fast or loaded the machine is
    job_id = submit(slurm_cluster, run_dir, shards, GAL_FAULT_PAUSE=f"step:{PAUSE}")
    deadline = time.monotonic() + 600
    while not any(r.get("step", 0) >= PAUSE and "event" not in r for r in rows(run_dir)):
        assert slurm_cluster.state(job_id) in ("PENDING", "CONFIGURING", "RUNNING"), \
            Path(f"{run_dir}.out").read_text()[-5000:]
        assert time.monotonic() < deadline, f"step {PAUSE} not reached in 600 s"
        time.sleep(0.1)
    # what --signal=B:USR1@180 sends before the time limit: USR1 to the batch shell only
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    job = slurm_cluster.wait(job_id, timeout=600)  # through the requeue and its BeginTime

    log = Path(f"{run_dir}.out").read_text()  # --open-mode=append: both runs' output
    assert (job.state, job.exit_code, job.fields["Restarts"]) == ("COMPLETED", 0, "1"), log[-5000:]
    assert "SIGUSR1: checkpoint and exit" in log
    assert len(re.findall(r"task \d: Exited with exit code 75", log)) == 2  # both ranks, through srun
    assert f"requeueing job {job_id}" in log and "restart 1:" in log
    stop = events(run_dir, "preempted")[0]["step"]
    assert stop == PAUSE + 1  # the flag travels with the next step's loss all-reduce
    assert [e["tag"] for e in events(run_dir, "checkpoint")] == [f"step{stop:08d}", f"step{STEPS:08d}"]
    assert [(e["step"], e["resumed"], e["world_size"]) for e in events(run_dir, "start")] == \
        [(0, False, 2), (stop, True, 2)]
    assert losses(run_dir) == losses(straight[1])  # every step, exact equality (in the run's precision)
