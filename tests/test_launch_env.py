"""launch/env.py and launch/slurm.py: rank, world and rendezvous address from torchrun, SLURM or nothing;
topology errors; slurm/pretrain.sbatch's rendezvous and requeue agree with launch/slurm.py.

The SLURM cases use environments as srun and sbatch really set them (recorded on the local cluster),
and one test runs detect() inside a real 2-node srun step. The sbatch checks run its own lines with bash
and a stand-in scontrol.
"""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from helpers import REPO
from launch import slurm
from launch.env import DistEnv, check_topology, detect
from launch.slurm import first_host, master_port, requeue_if_preempted
from pretrain.config import ConfigError

SBATCH = REPO / "slurm" / "pretrain.sbatch"
JOB_IDS = [1, 12, 19999, 20000, 20001, 43210, 123456, 9_876_543_210]

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


def test_master_port_is_derived_from_the_job_id():
    assert [master_port(j) for j in (1, 12, 19999, 20000, 123456)] == [20001, 20012, 39999, 20000, 23456]
    assert all(slurm.PORT_BASE <= master_port(j) < slurm.PORT_BASE + slurm.PORT_SPAN for j in JOB_IDS)


def test_srun_task_master_from_the_environment_and_uneven_tasks_per_node(no_scontrol):
    env = {**SRUN_TASK, "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[007-009]", "SLURM_NODEID": "2",
           "SLURM_PROCID": "8", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "9",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2),1"}
    got = detect(env)
    assert (got.rank, got.world_size, got.local_world_size, got.master_addr, got.master_port) == \
        (8, 9, 1, "gpu007", master_port(123456))
    got = detect({**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31000"})
    assert (got.master_addr, got.master_port) == ("10.1.2.3", 31000)


def test_a_step_on_some_of_the_jobs_nodes_rendezvous_on_the_steps_first_node(no_scontrol):
    env = {**SRUN_TASK, "SLURM_JOB_NODELIST": "node[1-4]", "SLURM_STEP_NODELIST": "node[3-4]"}
    assert detect(env).master_addr == "node3"


def test_submitit_local_tasks():
    env = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
           "SUBMITIT_LOCAL_JOB_ID": "43210"}
    assert detect(env) == DistEnv(1, 1, 2, 2, "127.0.0.1", master_port(43210), "submitit-local")


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
    assert first_host(nodelist) == first


def test_export_sets_the_rendezvous_variables(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # restored (removed) after the test
    DistEnv(1, 0, 2, 1, "node1", 20012, "slurm").export()
    assert [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                    "MASTER_PORT")] == ["1", "0", "2", "1", "node1", "20012"]


def test_check_topology_errors_name_the_key():
    check_topology(16, 8, 8, gpus=True)  # TP inside a node: fine
    check_topology(4, 4, 1, gpus=False)  # on CPUs TP may span "nodes" (tests)
    with pytest.raises(ConfigError, match=r"trainer.tensor_parallel=0 must be >= 1"):
        check_topology(8, 0, 8, gpus=True)
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by trainer.tensor_parallel=4"):
        check_topology(6, 4, 2, gpus=False)
    with pytest.raises(ConfigError, match=r"trainer.tensor_parallel=16 is larger than the 8 GPUs per node"):
        check_topology(32, 16, 8, gpus=True)


@pytest.mark.slurm
def test_detect_in_a_real_two_node_srun_step(slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "detect.out"
    code = "import json, dataclasses; from launch.env import detect; print(json.dumps(dataclasses.asdict(detect())))"
    job = slurm_cluster.sbatch_wait("--nodes=2", "--ntasks-per-node=1", "--time=2", f"--output={out}",
                                    f"--wrap=srun python -c '{code}'", timeout=300)
    assert (job.state, job.exit_code) == ("COMPLETED", 0), out.read_text()
    rows = sorted((json.loads(x) for x in out.read_text().splitlines() if x.startswith("{")), key=lambda r: r["rank"])
    port = master_port(int(job.id))
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
    assert [first_host(n) for n in NODELISTS] == want
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    assert [first_host(n) for n in NODELISTS] == want


# ----------------------------------------------------------------------------- slurm/pretrain.sbatch
# A stand-in scontrol: `show hostnames` expands to node3 node4, `show node -o nodeN` answers NodeAddr
# 10.0.0.N, `requeue ID` appends ID to $SCONTROL_LOG.
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'node3\\nnode4\\n' ;;
  "show node") echo "NodeName=$4 Arch=x86_64 NodeAddr=10.0.0.${4#node} NodeHostName=$4 State=IDLE" ;;
  "requeue "*) echo "$2" >> "$SCONTROL_LOG" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def fake_scontrol(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    log = tmp_path / "scontrol.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_LOG", str(log))
    return log


def sbatch_rendezvous(job_id, **env) -> tuple[str, int]:
    """Run slurm/pretrain.sbatch's rendezvous lines (head_node= .. export MASTER_PORT=) with bash."""
    text = SBATCH.read_text()
    block = re.search(r"^head_node=.*?^export MASTER_PORT=[^\n]*$", text, re.S | re.M).group(0)
    clean = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(["bash", "-uc", f'{block}\necho "$MASTER_ADDR $MASTER_PORT"'], capture_output=True,
                         text=True, check=True, timeout=30,
                         env=clean | {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "node[3-4]"} | env)
    addr, port = out.stdout.split()
    return addr, int(port)


def test_sbatch_and_launch_compute_the_same_rendezvous_port(fake_scontrol):
    for job_id in JOB_IDS:
        assert sbatch_rendezvous(job_id) == ("10.0.0.3", master_port(job_id)), job_id
    # the environment wins, in both
    assert sbatch_rendezvous(12, MASTER_ADDR="10.9.9.9", MASTER_PORT="31000") == ("10.9.9.9", 31000)
    env = {**SRUN_TASK, "SLURM_JOB_ID": "12", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "31000"}
    assert (detect(env).master_addr, detect(env).master_port) == ("10.9.9.9", 31000)


def test_a_task_without_the_batch_scripts_address_uses_the_first_host(fake_scontrol):
    """Plain srun, no MASTER_ADDR: each task takes the step's first host name (scontrol show hostnames),
    not its NodeAddr, which only the batch script looks up (once per job, not once per task)."""
    env = {**SRUN_TASK, "SLURM_STEP_NODELIST": "node[3-4]"}
    assert (detect(env).master_addr, detect(env).master_port) == ("node3", master_port(12))


def test_sbatch_requeues_on_launchs_exit_code():
    text = SBATCH.read_text()
    assert int(re.search(r"^EXIT_PREEMPTED=(\d+)", text, re.M).group(1)) == slurm.EXIT_PREEMPTED
    assert re.search(r'if \[ "\$rc" -eq "\$EXIT_PREEMPTED" \]; then\n[^\n]*\n\s*scontrol requeue "\$SLURM_JOB_ID"',
                     text)


@pytest.mark.parametrize("code, executor, requeued", [
    (slurm.EXIT_PREEMPTED, "slurm", True),
    (slurm.EXIT_PREEMPTED, "local", False),  # hydra/launcher=local: no Slurm job to requeue
    (slurm.EXIT_PREEMPTED, None, False),  # slurm/pretrain.sbatch: the batch script requeues
    (0, "slurm", False),
    (3, "slurm", False),  # the loss guard stopped the run
])
def test_requeue_if_preempted(fake_scontrol, code, executor, requeued):
    env = {"SLURM_JOB_ID": "4242"} | ({"SUBMITIT_EXECUTOR": executor} if executor else {})
    assert requeue_if_preempted(code, env) is requeued
    assert (fake_scontrol.read_text() if fake_scontrol.exists() else "") == ("4242\n" if requeued else "")


def test_a_failed_requeue_is_reported_not_raised(no_scontrol, capsys):
    assert requeue_if_preempted(slurm.EXIT_PREEMPTED, {"SLURM_JOB_ID": "7", "SUBMITIT_EXECUTOR": "slurm"})
    assert "scontrol requeue 7 failed" in capsys.readouterr().err
