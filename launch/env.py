"""Where am I? Rank, local rank, world size and rendezvous address from the environment.

One place reads them, in this order:

* **torchrun** (or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``);
* **SLURM** under ``srun`` (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``; the master
  is ``MASTER_ADDR`` if set, else the first host of the step's nodelist as ``scontrol show hostnames``
  expands it; the port is derived from the job id so that two jobs sharing a node do not collide: the
  rules of launch/slurm.py).
  The batch script itself also carries ``SLURM_PROCID=0`` but no step id: there a world of more than
  one task is an error (start the tasks with srun), a world of one is a single process;
* **submitit's local executor** (``hydra/launcher=local`` with ``tasks_per_node > 1``: one machine,
  ``SUBMITIT_LOCAL_GLOBALID`` / ``SUBMITIT_LOCAL_NTASKS``; the port is derived from its job id);
* **nothing**: a single process, rank 0 of 1.

No ssh, no pdsh, no hostfile: every process finds the others through the master address.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from launch.slurm import master_addr, master_port
from pretrain.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm", "submitit-local" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Set the variables torch.distributed's env:// rendezvous reads."""
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_WORLD_SIZE=str(self.local_world_size), MASTER_ADDR=self.master_addr,
                          MASTER_PORT=str(self.master_port))


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """``SLURM_TASKS_PER_NODE`` such as ``2(x3),1`` → the task count of node ``node_id``."""
    counts = []
    for part in tasks_per_node.split(","):
        n, _, times = part.partition("(x")
        counts += [int(n)] * int(times.rstrip(")") or 1)
    return counts[node_id] if node_id < len(counts) else counts[-1]


def detect(environ: dict | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                       int(env.get("LOCAL_WORLD_SIZE", world)), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env:
        step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
        if step is None:  # the batch script itself (it has SLURM_PROCID=0 too), not an srun task
            if world > 1:
                raise RuntimeError(f"SLURM_NTASKS={world}, but this process is the job's batch script, not one "
                                   "of its tasks: start one process per task with srun (slurm/pretrain.sbatch)")
            return DistEnv(0, 0, 1, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0) or 0), "single")
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
        local_world = _tasks_on_node(per_node, int(env.get("SLURM_NODEID", 0)))
        port = int(env.get("MASTER_PORT") or master_port(int(env["SLURM_JOB_ID"])))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world, local_world,
                       master_addr(env), port, "slurm")
    if "SUBMITIT_LOCAL_GLOBALID" in env and "SUBMITIT_LOCAL_NTASKS" in env:
        world = int(env["SUBMITIT_LOCAL_NTASKS"])
        port = int(env.get("MASTER_PORT") or master_port(int(env.get("SUBMITIT_LOCAL_JOB_ID", 0))))
        return DistEnv(int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env.get("SUBMITIT_LOCAL_LOCALID", 0)), world, world,
                       env.get("MASTER_ADDR", "127.0.0.1"), port, "submitit-local")
    return DistEnv(0, 0, 1, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0) or 0), "single")


def check_topology(world_size: int, tensor_parallel: int, local_world_size: int, *, gpus: bool) -> None:
    """Clear errors for layouts that cannot work, naming the config key. The one check that TP divides the
    world size: it runs before the process groups are built (pretrain/train.py), and needs no model or data."""
    if tensor_parallel < 1:
        raise ConfigError(f"trainer.tensor_parallel={tensor_parallel} must be >= 1")
    if world_size % tensor_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by trainer.tensor_parallel={tensor_parallel}")
    if gpus and tensor_parallel > local_world_size:
        raise ConfigError(f"trainer.tensor_parallel={tensor_parallel} is larger than the {local_world_size} GPUs "
                          "per node: tensor parallelism must stay inside a node (NVLink)")
