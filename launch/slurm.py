"""The Slurm rules, once: the rendezvous port and address of a job, and its requeue after a preemption.

* **Port**: ``PORT_BASE + job_id % PORT_SPAN``, so that two jobs sharing a node do not collide (unless
  their ids differ by a multiple of ``PORT_SPAN``). slurm/pretrain.sbatch computes the same in shell
  arithmetic; tests/test_launch_env.py runs its line with bash and compares it with :func:`master_port`.
* **Address**: ``MASTER_ADDR`` if set (slurm/pretrain.sbatch and conf/hydra/launcher/slurm.yaml export the
  first node's ``NodeAddr``, looked up once per job), else the first host of the step's nodelist (a step
  may use a subset of the job's nodes) as ``scontrol show hostnames`` expands it.
* **Requeue**: the trainer exits with ``EXIT_PREEMPTED`` after a SIGUSR1/SIGTERM checkpoint. Under
  slurm/pretrain.sbatch the batch script requeues the job; under a Hydra sweep (hydra-submitit-launcher,
  ``SUBMITIT_EXECUTOR=slurm``) nothing else does, so the trainer calls :func:`requeue_if_preempted`.
  A requeued job keeps its id, hence its port and run directory, and resumes from the checkpoint.

Only the standard library: launch/env.py and the trainer import this before anything else.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping

# Rendezvous ports PORT_BASE .. PORT_BASE + PORT_SPAN - 1 (20000-39999): unprivileged, and the same
# constants as slurm/pretrain.sbatch's MASTER_PORT line.
PORT_BASE = 20000
PORT_SPAN = 20000
# EX_TEMPFAIL (sysexits.h), "try again later": the trainer's exit code after a preemption checkpoint;
# slurm/pretrain.sbatch requeues on it.
EXIT_PREEMPTED = 75
HOSTNAMES_TIMEOUT_S = 30  # scontrol show hostnames: local parsing, normally instant
REQUEUE_TIMEOUT_S = 60  # scontrol requeue: a round trip to slurmctld, which may be busy


def master_port(job_id: int) -> int:
    """The rendezvous port of Slurm job ``job_id`` (and of submitit-local job ids)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist such as ``gpu[003-005,009]``, as ``scontrol show hostnames``
    expands it; without a working scontrol (no slurm.conf, a container) the first entry is expanded here."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=HOSTNAMES_TIMEOUT_S).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], nodelist[:end])


def master_addr(environ: Mapping[str, str] = os.environ) -> str:
    """``MASTER_ADDR``, else the first host of the step's nodelist (else the job's; rank 0 runs there)."""
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "localhost")
    return environ.get("MASTER_ADDR") or first_host(nodelist)


def requeue(job_id: str) -> None:
    """``scontrol requeue job_id``. A failure is reported on stderr, not raised: the caller is exiting."""
    try:
        proc = subprocess.run(["scontrol", "requeue", str(job_id)], check=False, timeout=REQUEUE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"launch.slurm: scontrol requeue {job_id} failed: {e}", file=sys.stderr)
        return
    if proc.returncode:
        print(f"launch.slurm: scontrol requeue {job_id} exited {proc.returncode}", file=sys.stderr)


def requeue_if_preempted(exit_code: int, environ: Mapping[str, str] = os.environ) -> bool:
    """Requeue this Slurm job if the trainer exits ``EXIT_PREEMPTED`` as a sweep point
    (``SUBMITIT_EXECUTOR=slurm``; under slurm/pretrain.sbatch the batch script requeues). Call it on
    rank 0 only. Returns whether it asked Slurm to requeue."""
    if exit_code != EXIT_PREEMPTED or environ.get("SUBMITIT_EXECUTOR") != "slurm" or "SLURM_JOB_ID" not in environ:
        return False
    requeue(environ["SLURM_JOB_ID"])
    return True
