"""Process groups for tensor (TP) and data (DP) parallelism, in one place.

The model's maths (model/transformer.py) only uses megatron-core's tensor-parallel layers; everything
about *which* processes form a group lives here:

* `init_distributed(tensor_parallel_size)` starts torch.distributed (from the torchrun / Slurm
  environment, or as a single-process world when there is none) and megatron-core's `parallel_state`.
* `tp_rank()`, `tp_size()`, `dp_rank()`, `dp_size()` and `tp_group()`, `dp_group()`.
* `DeepSpeedMPU`: the `mpu=` object `deepspeed.initialize` expects (DeepSpeed asks for
  `get_model_parallel_*` / `get_data_parallel_*`, which parallel_state names differently).
* `manual_seed(seed)` and `tp_rng_fork(device)`: dropout on activations that are *split* over TP
  ranks (attention probabilities of a rank's heads) must use a different random stream on each TP
  rank, while dropout on *replicated* activations (the residual stream) must be identical on all TP
  ranks. Megatron's `CudaRNGStatesTracker` does this on CUDA only; `TensorParallelRNG` does the same
  on the CPU and delegates to megatron's tracker on CUDA.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import random as mrandom

# Megatron's offset between the data-parallel seed and the tensor-parallel seed (random.py).
_TP_SEED_OFFSET = 2718


def init_distributed(tensor_parallel_size: int = 1, backend: str | None = None, timeout_s: float = 1800) -> None:
    """Start torch.distributed and megatron's model-parallel groups if not done yet (idempotent).

    With RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment (torchrun, or the Slurm
    wrapper in `launch/`) it joins that world; without them it makes a world of one process
    (in-memory store, no port). The backend is gloo on the CPU and NCCL when CUDA is available.
    """
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} but the model-parallel groups are "
                             f"already initialized with {ps.get_tensor_model_parallel_world_size()}")
        return
    world = dist.get_world_size()
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must be >= 1 and divide the world size {world}")
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)


def ensure_initialized() -> None:
    """Single-process default: a world of one with TP=1, unless the caller set something up already."""
    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        init_distributed(tensor_parallel_size=1)


def destroy() -> None:
    """Tear down megatron's groups and torch.distributed (tests, notebooks)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    TensorParallelRNG.instance = None


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


def tp_group():
    return ps.get_tensor_model_parallel_group()


def dp_rank() -> int:
    return ps.get_data_parallel_rank()


def dp_size() -> int:
    return ps.get_data_parallel_world_size()


def dp_group():
    return ps.get_data_parallel_group()


class DeepSpeedMPU:
    """The `mpu` adapter for `deepspeed.initialize(..., mpu=DeepSpeedMPU())` (checked against 0.19.8).

    Model parallel == tensor parallel here (no pipeline stages), so DeepSpeed's "slice" and
    "model" groups are megatron's tensor-parallel group.
    """

    def get_model_parallel_rank(self) -> int:
        return tp_rank()

    def get_model_parallel_world_size(self) -> int:
        return tp_size()

    def get_model_parallel_group(self):
        return tp_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_slice_parallel_rank = get_model_parallel_rank
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self) -> int:
        return dp_rank()

    def get_data_parallel_world_size(self) -> int:
        return dp_size()

    def get_data_parallel_group(self):
        return dp_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(dp_group())

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size


class TensorParallelRNG:
    """Random stream for dropout on TP-split activations: seeded with seed + 2718 + tp_rank.

    The default torch generator (seeded identically on every TP rank by `manual_seed`) serves the
    replicated activations. `fork(device)` swaps the TP stream in for the duration of a block, like
    megatron's `get_cuda_rng_tracker().fork()` (which it uses on CUDA). `get_state`/`set_state`
    let activation checkpointing replay the same masks in the recomputation.
    """

    instance: "TensorParallelRNG | None" = None

    def __init__(self, seed: int):
        self.seed = seed
        gen = torch.Generator().manual_seed(seed + _TP_SEED_OFFSET + tp_rank())
        self.cpu_state = gen.get_state()
        if torch.cuda.is_available():
            mrandom.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank())

    @contextlib.contextmanager
    def fork(self, device: torch.device):
        if device.type == "cuda":
            with mrandom.get_cuda_rng_tracker().fork():
                yield
            return
        outer = torch.get_rng_state()
        torch.set_rng_state(self.cpu_state)
        try:
            yield
        finally:
            self.cpu_state = torch.get_rng_state()
            torch.set_rng_state(outer)

    def get_state(self):
        cuda = mrandom.get_cuda_rng_tracker().get_states() if torch.cuda.is_available() else None
        return self.cpu_state.clone(), (dict(cuda) if cuda is not None else None)

    def set_state(self, state) -> None:
        self.cpu_state, cuda = state[0].clone(), state[1]
        if cuda is not None:
            mrandom.get_cuda_rng_tracker().set_states(dict(cuda))


def manual_seed(seed: int) -> None:
    """Seed everything a model rank needs: the default generators (the same on all TP ranks: the
    caller adds its data-parallel offset if it wants DP ranks to differ) and the TP stream."""
    ensure_initialized()
    torch.manual_seed(seed)
    TensorParallelRNG.instance = TensorParallelRNG(seed)


def tp_rng() -> TensorParallelRNG:
    """The TP stream; seeded from `torch.initial_seed()` if `manual_seed` was never called."""
    if TensorParallelRNG.instance is None:
        TensorParallelRNG.instance = TensorParallelRNG(torch.initial_seed() % (2**62))
    return TensorParallelRNG.instance


def tp_rng_fork(device: torch.device):
    return tp_rng().fork(device)


class _GatherLastDim(torch.autograd.Function):
    """All-gather TP shards along the last dim; backward keeps this rank's slice. (megatron's
    `gather_from_tensor_model_parallel_region` allocates on CUDA unconditionally.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.size = tp_rank(), tp_size()
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=tp_group())
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.chunk(ctx.size, dim=-1)[ctx.rank].contiguous()


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Full tensor from the TP shards of its last dimension (identity at TP=1)."""
    return x if tp_size() == 1 else _GatherLastDim.apply(x)
