"""A real Slurm cluster for the tests: a controller and two emulated nodes (node1, node2) on 127.0.0.1.

The session fixture ``slurm_cluster`` reuses a cluster that already answers at ``$SLURM_CI_DIR``
(default /tmp/slurm-ci) and leaves it running; otherwise it starts one with ``start-slurm.sh``
(root and Debian's slurmctld/slurmd/slurm-client/munge packages; skipped with the reason when they
cannot be had) and stops exactly that one at the end with ``stop-slurm.sh``.

    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch_wait("--nodes=2", "--wrap=srun hostname")
        assert job.state == "COMPLETED" and job.exit_code == 0

Jobs inherit ``slurm_cluster.env`` (sbatch's default --export=ALL): SLURM_CONF, and a PATH with the
cluster's ``bin/`` (the ``sacct`` stand-in) and this interpreter's directory (the repo's .venv) first.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NODES = ("node1", "node2")
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# sbatch_wait.sh's "not finished yet" states; REQUEUED/PENDING after a requeue are waited through
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
          "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", ""}


@dataclass
class Job:
    id: str
    state: str  # JobState: COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    exit_code: int  # the batch script's exit status
    signal: int  # the signal that ended it, 0 if none
    fields: dict = field(repr=False)  # everything `scontrol show job -o` said, last poll


@dataclass
class SlurmCluster:
    dir: Path
    env: dict  # for clients and jobs: SLURM_CONF, PATH (cluster bin/, .venv/bin first)
    nodes: tuple[str, ...] = NODES
    started_here: bool = False

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, env: dict | None = None):
        """Run a Slurm client (sbatch, scontrol, ...) with the cluster's environment."""
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})},
                              cwd=REPO)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        """Submit; the job id. Runs in the repo root (the job's working directory)."""
        out = self.run("sbatch", "--parsable", *args, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o ID` as a dict ({} once the controller forgot it)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "")

    def wait(self, job_id: str, timeout: float = 300, poll_s: float = 0.2, skip_requeue_delay: bool = True) -> Job:
        """Poll every 0.2 s until the job ended (through requeues); as sbatch_wait.sh, but returns a Job.

        A requeued job may not start before ``cred_expire`` seconds (120 by default; the clusters
        start-slurm.sh makes use 10): with ``skip_requeue_delay`` its BeginTime is set to now."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            st = fields.get("JobState", "")
            if st not in ACTIVE:
                code, sig = (fields.get("ExitCode", "0:0").split(":") + ["0"])[:2]
                return Job(job_id, st, int(code), int(sig), fields)
            if skip_requeue_delay and st == "PENDING" and fields.get("Reason") == "BeginTime":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"Slurm job {job_id} still {st} after {timeout:.0f} s: {fields}")
            time.sleep(poll_s)

    def sbatch_wait(self, *args: str, timeout: float = 300, env: dict | None = None) -> Job:
        return self.wait(self.sbatch(*args, env=env), timeout=timeout)


def _cluster_env(d: Path) -> dict:
    env = dict(os.environ)
    env["SLURM_CONF"] = str(d / "etc" / "slurm.conf")
    env["PATH"] = os.pathsep.join([str(d / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
    # pytest itself might run inside a Slurm job or torchrun: don't leak their variables into the jobs
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"] + list(TORCHRUN_VARS):
        env.pop(key, None)
    return env


def _answering(env: dict) -> bool:
    if not Path(env["SLURM_CONF"]).exists() or not shutil.which("sinfo", path=env["PATH"]):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15,
                             env=env).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return False
    return all(n in out for n in NODES)


@pytest.fixture(scope="session")
def slurm_cluster():
    d = Path(os.environ.get("SLURM_CI_DIR", "/tmp/slurm-ci"))
    env = _cluster_env(d)
    if _answering(env):
        yield SlurmCluster(d, env)
        return
    if os.geteuid() != 0:
        pytest.skip(f"no Slurm cluster answers at SLURM_CI_DIR={d}, and starting one (tests/slurm/start-slurm.sh) "
                    "needs root")
    if not (shutil.which("apt-get") or shutil.which("slurmctld")):
        pytest.skip(f"no Slurm cluster answers at SLURM_CI_DIR={d}, and tests/slurm/start-slurm.sh needs apt-get "
                    "(Debian's slurmctld, slurmd, slurm-client, munge packages)")
    proc = subprocess.run(["bash", str(HERE / "start-slurm.sh")], capture_output=True, text=True, timeout=600,
                          env={**env, "SLURM_CI_DIR": str(d), "NODES": str(len(NODES)), "CPUS": "2"})
    started = SlurmCluster(d, env, started_here=True)
    try:
        if proc.returncode != 0:
            if not shutil.which("slurmctld"):
                pytest.skip(f"could not install Slurm's Debian packages (slurmctld slurmd slurm-client munge):\n"
                            f"{proc.stderr[-2000:]}")
            pytest.fail(f"tests/slurm/start-slurm.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                        f"{proc.stderr[-3000:]}")
        yield started
    finally:
        subprocess.run(["bash", str(HERE / "stop-slurm.sh")], env={**env, "SLURM_CI_DIR": str(d)}, timeout=60)
