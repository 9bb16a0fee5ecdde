"""launch/env.py: rank, world and rendezvous address from torchrun, SLURM or nothing; topology errors.

The SLURM cases use environments as srun and sbatch really set them (recorded on the local cluster),
and one test runs detect() inside a real 2-node srun step.
"""
from __future__ import annotations

import json
import os

import pytest

from launch.env import DistEnv, check_topology, detect, first_slurm_host
from slurm.conftest import slurm_cluster  # noqa: F401 (the session fixture, tests/slurm/conftest.py)

NODELISTS = ["gpu[003-005,009]", "gpu[009,003-005]", "a1,b[2-3]", "node7", "rack[2-3]-n[07-09]", "c[10,2]"]

# What srun sets for task 1 of `sbatch --nodes=2 --ntasks-per-node=1` + `srun` (job 12, node2)
SRUN_TASK = {"SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_ID": "0",
             "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}
# ... and what the batch script itself sees: SLURM_PROCID=0 as well, but no step
BATCH_SHELL = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0",
                                                                                       "SLURM_NODEID": "0"}


@pytest.fixture
def no_scontrol(monkeypatch, tmp_path):
    """A PATH without scontrol: the nodelist is expanded by env.py itself."""
    monkeypatch.setenv("PATH", str(tmp_path))


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.7",
           "MASTER_PORT": "29511", **SRUN_TASK}  # torchrun inside a Slurm job: torchrun's view
    assert detect(env) == DistEnv(3, 1, 8, 2, "10.0.0.7", 29511, "torchrun")


def test_nothing_is_a_single_process():
    assert detect({}) == DistEnv(0, 0, 1, 1, "127.0.0.1", 0, "single")
    assert detect({}).is_main


def test_srun_task(no_scontrol):
    assert detect(SRUN_TASK) == DistEnv(1, 0, 2, 1, "node1", 20012, "slurm")


def test_srun_task_master_from_the_environment_and_uneven_tasks_per_node(no_scontrol):
    env = {**SRUN_TASK, "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[007-009]", "SLURM_NODEID": "2",
           "SLURM_PROCID": "8", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "9",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2),1"}
    got = detect(env)
    assert (got.rank, got.world_size, got.local_world_size, got.master_addr, got.master_port) == \
        (8, 9, 1, "gpu007", 20000 + 123456 % 20000)
    got = detect({**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31000"})
    assert (got.master_addr, got.master_port) == ("10.1.2.3", 31000)


def test_a_step_on_some_of_the_jobs_nodes_rendezvous_on_the_steps_first_node(no_scontrol):
    env = {**SRUN_TASK, "SLURM_JOB_NODELIST": "node[1-4]", "SLURM_STEP_NODELIST": "node[3-4]"}
    assert detect(env).master_addr == "node3"


def test_submitit_local_tasks():
    env = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
           "SUBMITIT_LOCAL_JOB_ID": "43210"}
    assert detect(env) == DistEnv(1, 1, 2, 2, "127.0.0.1", 20000 + 43210 % 20000, "submitit-local")


def test_the_batch_script_without_srun_is_a_clear_error():
    with pytest.raises(RuntimeError, match="SLURM_NTASKS=2.*batch script.*srun"):
        detect(BATCH_SHELL)
    one = {**BATCH_SHELL, "SLURM_NTASKS": "1", "SLURM_TASKS_PER_NODE": "1"}
    assert detect(one).source == "single"


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[003-005,009]", "gpu003"), ("gpu[009,003-005]", "gpu009"), ("a1,b[2-3]", "a1"), ("node7", "node7"),
    ("n[1-2]-ib,x9", "n1-ib"), ("rack[2-3]-n[07-09]", "rack2-n07"), ("c[10,2]", "c10"),
])
def test_first_host_without_scontrol(no_scontrol, nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_export_sets_the_rendezvous_variables(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # restored (removed) after the test
    DistEnv(1, 0, 2, 1, "node1", 20012, "slurm").export()
    assert [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT")] == ["1", "0", "2", "1", "node1", "20012"]


def test_check_topology_errors_name_the_key():
    check_topology(16, 8, 8, gpus=True)  # TP inside a node: fine
    check_topology(4, 4, 1, gpus=False)  # on CPUs TP may span "nodes" (tests)
    with pytest.raises(ValueError, match=r"trainer.tensor_parallel=0 must be >= 1"):
        check_topology(8, 0, 8, gpus=True)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by trainer.tensor_parallel=4"):
        check_topology(6, 4, 2, gpus=False)
    with pytest.raises(ValueError, match=r"trainer.tensor_parallel=16 is larger than the 8 GPUs per node"):
        check_topology(32, 16, 8, gpus=True)


@pytest.mark.slurm
def test_detect_in_a_real_two_node_srun_step(slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "detect.out"
    code = "import json, dataclasses; from launch.env import detect; print(json.dumps(dataclasses.asdict(detect())))"
    job = slurm_cluster.sbatch_wait("--nodes=2", "--ntasks-per-node=1", "--time=2", f"--output={out}",
                                    f"--wrap=srun python -c '{code}'", timeout=300)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), out.read_text()
    rows = sorted((json.loads(x) for x in out.read_text().splitlines() if x.startswith("{")), key=lambda r: r["rank"])
    port = 20000 + int(job.id) % 20000
    assert rows == [  # node[1-2] expanded by the cluster's scontrol; the job id gives the port
        {"rank": 0, "local_rank": 0, "world_size": 2, "local_world_size": 1, "master_addr": "node1",
         "master_port": port, "source": "slurm"},
        {"rank": 1, "local_rank": 0, "world_size": 2, "local_world_size": 1, "master_addr": "node1",
         "master_port": port, "source": "slurm"},
    ]


@pytest.mark.slurm
def test_first_host_by_scontrol_and_by_hand_agree(slurm_cluster, monkeypatch, tmp_path):  # noqa: F811
    want = [slurm_cluster.run("scontrol", "show", "hostnames", n).stdout.split()[0] for n in NODELISTS]
    assert want[:2] == ["gpu003", "gpu009"]  # scontrol keeps the list's order
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    assert [first_slurm_host(n) for n in NODELISTS] == want
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    assert [first_slurm_host(n) for n in NODELISTS] == want
