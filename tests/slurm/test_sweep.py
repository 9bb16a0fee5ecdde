"""Hydra sweeps on the real local Slurm cluster through hydra-submitit-launcher (conf/hydra/launcher/).

`gal-train -m hydra/launcher=slurm optim.lr_max=1e-3,2e-3` submits one Slurm job per point, each a
2-rank data-parallel run (node1 + node2) with its own run directory and wandb run, grouped by the
sweep. One point is preempted (SIGUSR1) mid-run: it checkpoints, requeues itself and resumes.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers import BIN, REPO, synthetic_shards
from pretrain.analysis.records import read_metrics

SEQ, STEPS = 32, 24  # 8 steps an epoch
LRS = (1e-3, 2e-3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("shards"), SEQ, 32, samples_per_shard=16)


def job_env(cluster) -> dict:
    # the checkout importable (hydra_plugins/ too), wandb offline and silent
    env = {**cluster.env, "WANDB_SILENT": "true", "NETRC": os.devnull, "PYTHONPATH": str(REPO)}
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        env.pop(key, None)
    return env


def rows(run: Path, event: str | None = None) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == event]


def wandb_run_record(run: Path) -> dict:
    run_file = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))[0]
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(run_file)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    records = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    return next(r["run"] for r in records if r["type"] == "run")


@pytest.mark.slurm
@pytest.mark.trainer
@pytest.mark.multirank
@pytest.mark.slow
def test_lr_sweep_two_data_parallel_points_on_slurm(slurm_cluster, shards, tmp_path):
    sweep = tmp_path / "lr_sweep"
    cmd = [str(BIN / "gal-train"), "-m", "hydra/launcher=slurm",
           # 2 nodes × 1 task: each point is a 2-rank data-parallel run across node1 and node2
           "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=null",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5", "hydra.launcher.signal_delay_s=30",
           # point 0's ranks wait after step 2 for the signal (GAL_FAULT_PAUSE, pretrain/trainer/faults.py), so the
           # preemption lands mid-run however fast the machine is; the nodes' address is 127.0.0.1 (the
           # configured NodeAddr lookup is checked in test_launcher_setup_finds_the_first_nodes_address)
           "hydra.launcher.setup=['export MASTER_ADDR=127.0.0.1',"
           "'if [ \"$SLURM_ARRAY_TASK_ID\" = 0 ]; then export GAL_FAULT_PAUSE=step:2; fi']",
           f"run_dir={sweep}", f"data.path={shards}", "model=tiny-2l", "trainer.global_batch_tokens=128",
           f"trainer.max_tokens={128 * STEPS}", "optim.warmup_tokens=256", "validation.enabled=false",
           "logger.console=false", "optim.lr_max=" + ",".join(map(str, LRS))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(slurm_cluster), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    array_id = None
    try:
        # preempt point 0 as Slurm would before its time limit, once it is training
        deadline = time.monotonic() + 240
        while not any(r.get("step", 0) >= 2 for r in rows(sweep / "0")):
            assert proc.poll() is None, proc.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "point 0 did not start training in 240 s"
            time.sleep(0.2)
        (array_id,) = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
        job0 = f"{array_id}_0"  # the array's first task: point 0
        slurm_cluster.run("scancel", "--signal=USR1", job0)
        while proc.poll() is None:  # the requeued job waits out its BeginTime (helpers.SlurmCluster.wait)
            assert time.monotonic() < deadline + 120, "the sweep did not finish"
            time.sleep(0.5)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            if array_id:
                slurm_cluster.run("scancel", array_id, check=False)
    assert proc.returncode == 0, out[-5000:]
    assert slurm_cluster.job(job0).get("Restarts") == "1"

    runs = [sweep / "0", sweep / "1"]
    lr_rows = []
    for run, lr_max in zip(runs, LRS):
        starts = rows(run, "start")
        assert {(s["world_size"], s["dp_size"]) for s in starts} == {(2, 2)}  # data-parallel across both nodes
        assert f"lr_max: {lr_max}" in (run / "config.yaml").read_text()
        steps = rows(run)
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # no step lost or repeated
        assert rows(run, "done")[0]["step"] == STEPS
        assert (run / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
        record = wandb_run_record(run)
        assert (record["display_name"], record["run_group"]) == (f"optim.lr_max={lr_max}", "lr_sweep")
        lr_rows.append([r["lr"] for r in steps])

    # point 0 was preempted once: it checkpointed, was requeued and resumed from that step
    (preempted,) = rows(runs[0], "preempted")
    assert [s["resumed"] for s in rows(runs[0], "start")] == [False, True]
    assert rows(runs[0], "start")[1]["step"] == preempted["step"] == 3  # paused after 2, stopped after the next
    assert not rows(runs[1], "preempted") and len(rows(runs[1], "start")) == 1
    # the same schedule at twice the peak
    assert lr_rows[1] == pytest.approx([2 * x for x in lr_rows[0]], rel=1e-6)
    assert rows(runs[0])[-1]["loss"] != rows(runs[1])[-1]["loss"]


@pytest.mark.slurm
def test_launcher_setup_finds_the_first_nodes_address(slurm_cluster, tmp_path):
    """The MASTER_ADDR line of conf/hydra/launcher/slurm.yaml, run in a real 2-node batch script: the first
    node's NodeAddr (node1 does not resolve in DNS here; Slurm reaches it at 127.0.0.1)."""
    import yaml

    setup = yaml.safe_load((REPO / "conf" / "hydra" / "launcher" / "slurm.yaml").read_text())["setup"]
    (line,) = [x for x in setup if "MASTER_ADDR" in x]
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch_wait("--nodes=2", "--ntasks-per-node=1", "--time=2", f"--output={out}",
                                    f"--wrap={line}; echo master=$MASTER_ADDR", timeout=120)
    assert job.state == "COMPLETED", out.read_text()
    assert "master=127.0.0.1" in out.read_text()


@pytest.mark.trainer
@pytest.mark.multirank
@pytest.mark.slow
def test_local_launcher_sweep(shards, tmp_path):
    """hydra/launcher=local: the points run as submitit jobs on this machine, each in its own directory,
    each a 2-rank data-parallel run (launch/env.py reads submitit's local task variables); the console gets a
    line as each point finishes, each wandb run is named by its learning rate, and no empty folder is left."""
    sweep = tmp_path / "local_sweep"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", NETRC=os.devnull, PYTHONPATH=str(REPO))
    proc = subprocess.run([str(BIN / "gal-train"), "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2",
                           f"run_dir={sweep}",
                           f"data.path={shards}", "model=tiny-2l", "trainer.global_batch_tokens=128",
                           "trainer.max_tokens=256", "validation.enabled=false", "logger.wandb=true",
                           "logger.console=false", "optim.lr_max=1e-3,2e-3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    progress = sorted(line.split("] ", 1)[-1] for line in proc.stdout.splitlines() if "] sweep " in line)
    assert [line[:15] for line in progress] == ["sweep 1/2 done:", "sweep 2/2 done:"], proc.stdout[-3000:]
    for run, lr_max in zip([sweep / "0", sweep / "1"], LRS):
        (start,) = rows(run, "start")
        assert (start["world_size"], start["dp_size"]) == (2, 2)
        assert f"lr_max: {lr_max}" in (run / "config.yaml").read_text()
        assert rows(run, "done")[0]["step"] == 2
        (line,) = [x for x in progress if f": optim.lr_max={lr_max} → loss " in x]
        assert line.endswith(f" after 2 steps, {run}")
        record = wandb_run_record(run)
        assert (record["display_name"], record["run_group"]) == (f"optim.lr_max={lr_max}", "local_sweep")
    assert [p.name for p in (sweep / ".submitit").iterdir() if not p.name.isdigit()] == []  # no '%j'
