"""The training loader: multi-epoch, deterministic, split across data-parallel ranks, resumable.

The whole run reads one global *sample stream*: epoch ``e`` is a permutation of the ``N`` training
samples seeded by ``(seed, e)``, and the stream is those permutations one after another. Position
``k`` of the stream is sample ``perm(seed, k // N)[k % N]``, seen for the ``(k // N)``-th time.

A global batch is the next ``global_batch_size`` stream positions after ``consumed_samples``; inside
it, micro-step ``j`` of data-parallel rank ``r`` takes the ``micro_batch_size`` positions starting at
``consumed_samples + (j * dp_size + r) * micro_batch_size``. So:

* every epoch visits every sample exactly once, in an order that differs between epochs;
* the ranks' slices are disjoint and together cover the global batch;
* the only state is ``consumed_samples`` (global, all ranks together): resuming on the same or on a
  different data-parallel size continues with the next unseen position, no repeat, no skip
  (the global batch in samples must stay the same, or the resume starts at a batch boundary of the
  new size, which is still exact);
* what a rank reads at a step is a function of (seed, step, rank), which makes bit-exact resume
  possible.

Reading goes through random access (``dataset[i]``, e.g. :class:`pretrain.data.shards.ShardReader`),
with a background thread prefetching the next batches so the model does not wait on data.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from model.config import IGNORE_INDEX


class RandomAccessSamples(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> np.ndarray: ...


# Other fixed draws from the data seed use stream tags no epoch number reaches: the `seen` validation
# sample (pretrain/evaluation/validation.py) and the probe molecules (pretrain/evaluation/probes.py).
SEEN_SAMPLE_STREAM, PROBE_MOLECULE_STREAM = 2**31 - 1, 2**31 - 2


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a permutation seeded by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def epochs_completed(before: int, after: int, per_epoch: int) -> int:
    """How many epoch boundaries a step crossed going from ``before`` to ``after`` (samples or tokens,
    with ``per_epoch`` in the same unit): the one epoch-boundary rule of the loop and validation."""
    return after // per_epoch - before // per_epoch


def make_batch(samples: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed samples of ``seq_len + 1`` tokens → (input_ids, labels), each ``(n, seq_len)`` int64: the
    labels are the inputs shifted by one, ``IGNORE_INDEX`` where the target is padding. The one rule
    for training and evaluation batches."""
    tokens = torch.from_numpy(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))
    labels = tokens[:, 1:].clone()
    labels[labels == pad_id] = IGNORE_INDEX
    return tokens[:, :-1].contiguous(), labels


@dataclass
class Batch:
    """One micro-batch of one data-parallel rank."""

    input_ids: torch.Tensor  # (micro_batch, seq_len) int64
    labels: torch.Tensor  # (micro_batch, seq_len) int64, IGNORE_INDEX where the target is padding
    sample_ids: np.ndarray  # (micro_batch,) index of each sample in the dataset
    epochs: np.ndarray  # (micro_batch,) how many times each sample was seen before this batch


class EpochLoader:
    """Yields this rank's micro-batches, one global batch (``grad_accum`` micro-steps) at a time.

    ``state_dict()`` counts only what was handed out by :meth:`next_global_batch`, never what the
    prefetch thread read ahead.
    """

    def __init__(self, samples: RandomAccessSamples, *, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 1234, pad_id: int = 1, prefetch: int = 4):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"micro_batch_size={micro_batch_size} × dp_size={dp_size}")
        if len(samples) == 0:
            raise ValueError("the training set has no samples")
        self.samples = samples
        self.num_samples = len(samples)
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.grad_accum = global_batch_size // (micro_batch_size * dp_size)
        self.seed, self.pad_id, self.prefetch = seed, pad_id, prefetch
        self.consumed_samples = 0
        self._perm_cache: dict[int, np.ndarray] = {}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ---- where we are -------------------------------------------------------------------------
    @property
    def epoch(self) -> float:
        """Epochs completed, as a fraction (2.5 = half-way through the third epoch)."""
        return self.consumed_samples / self.num_samples

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "epoch": self.consumed_samples // self.num_samples,
                "num_samples": self.num_samples, "seed": self.seed, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"checkpoint was written for {state['num_samples']} training samples, "
                             f"the shards have {self.num_samples}: a different dataset")
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint used data seed {state['seed']}, the config says {self.seed}")
        self._stop_prefetch()
        self.consumed_samples = int(state["consumed_samples"])

    # ---- the stream -----------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = epoch_permutation(self.num_samples, self.seed, epoch)
        return self._perm_cache[epoch]

    def stream_positions(self, consumed: int) -> list[np.ndarray]:
        """Stream positions of this rank's micro-batches in the global batch starting at ``consumed``."""
        mb, dp = self.micro_batch_size, self.dp_size
        return [consumed + (j * dp + self.dp_rank) * mb + np.arange(mb) for j in range(self.grad_accum)]

    def _read(self, positions: np.ndarray) -> Batch:
        epochs = positions // self.num_samples
        ids = np.array([self._permutation(int(e))[p % self.num_samples] for e, p in zip(epochs, positions)])
        input_ids, labels = make_batch([self.samples[int(i)] for i in ids], self.pad_id)
        return Batch(input_ids, labels, ids, epochs)

    def _global_batch(self, consumed: int) -> list[Batch]:
        return [self._read(p) for p in self.stream_positions(consumed)]

    # ---- prefetch -------------------------------------------------------------------------------
    def _producer(self, start: int) -> None:
        consumed = start
        try:
            while not self._stop.is_set():
                item = (consumed, self._global_batch(consumed))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                consumed += self.global_batch_size
        except BaseException as e:  # surfaced in the consumer, with the shard/sample that failed
            self._queue.put((consumed, e))

    def _stop_prefetch(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None
            self._stop.clear()

    def next_global_batch(self) -> list[Batch]:
        """This rank's ``grad_accum`` micro-batches of the next global batch; advances the state."""
        if self.prefetch <= 0:
            batches = self._global_batch(self.consumed_samples)
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._producer, args=(self.consumed_samples,), daemon=True)
                self._thread.start()
            consumed, batches = self._queue.get()
            assert consumed == self.consumed_samples, (consumed, self.consumed_samples)
            if isinstance(batches, BaseException):
                raise batches
        self.consumed_samples += self.global_batch_size
        return batches

    def close(self) -> None:
        self._stop_prefetch()

