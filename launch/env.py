"""Where am I? Rank, local rank, world size and rendezvous address from the environment.

One place reads them, in this order:

* **torchrun** (or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``);
* **SLURM** under ``srun`` (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``; the master is the
  first host of ``SLURM_JOB_NODELIST`` as ``scontrol show hostnames`` expands it; the port is derived
  from the job id so that two jobs sharing a node do not collide);
* **nothing**: a single process, rank 0 of 1.

No ssh, no pdsh, no hostfile: every process finds the others through the master address.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Set the variables torch.distributed's env:// rendezvous reads."""
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_WORLD_SIZE=str(self.local_world_size), MASTER_ADDR=self.master_addr,
                          MASTER_PORT=str(self.master_port))


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist such as ``gpu[003-005,009]``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # scontrol missing (e.g. inside a container): expand the first entry ourselves
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    first = ranges.rstrip("]").split(",")[0].split("-")[0]
    return prefix + first


def detect(environ: dict | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                       int(env.get("LOCAL_WORLD_SIZE", world)), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1)))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or max(1, world // max(1, nodes)))
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        port = int(env.get("MASTER_PORT") or 20000 + int(env["SLURM_JOB_ID"]) % 20000)
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world, local_world, addr,
                       port, "slurm")
    return DistEnv(0, 0, 1, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0) or 0), "single")


def check_topology(world_size: int, tensor_parallel: int, local_world_size: int, *, gpus: bool) -> None:
    """Clear errors for layouts that cannot work, naming the config key."""
    if tensor_parallel < 1:
        raise ValueError(f"trainer.tensor_parallel={tensor_parallel} must be >= 1")
    if world_size % tensor_parallel:
        raise ValueError(f"world size {world_size} is not divisible by trainer.tensor_parallel={tensor_parallel}")
    if gpus and tensor_parallel > local_world_size:
        raise ValueError(f"trainer.tensor_parallel={tensor_parallel} is larger than the {local_world_size} GPUs "
                         "per node: tensor parallelism must stay inside a node (NVLink)")
