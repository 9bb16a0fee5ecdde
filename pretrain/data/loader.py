"""The training loader: a mixture of per-source streams, multi-epoch, deterministic, split across
data-parallel ranks, resumable.

*Streams.* Each source of ``train/<source>/`` is a stream; ``data.repeat`` adds a stream ``repeated``: a
fixed subset of one source's samples (chosen by the data seed, left out of that source's own stream).
Stream ``s`` walks its ``N_s`` samples in epochs: epoch ``e`` is a permutation seeded by
``(seed, crc32(name), e)``, so position ``i`` of the stream is sample ``perm(e = i // N_s)[i % N_s]``,
seen for the ``e``-th time. A heavier or smaller stream simply repeats more often.

*Mixing.* ``data.mixture`` gives stream ``s`` the weight ``w_s`` (default: proportional to ``N_s``; a
repeated subset takes ``data.repeat.fraction`` and the rest share ``1 - fraction``). Position ``k`` of
the global sample stream goes to the stream furthest behind its share, ``argmax_s(w_s (k+1) - n_s)``,
where ``n_s`` counts what stream ``s`` has given so far (ties: the first stream). So after any ``k``
positions every stream has given ``w_s k`` samples to within one, in every prefix, not just on average.

*Batches.* A global batch is the next ``global_batch_size`` positions after ``consumed_samples``; inside
it, micro-step ``j`` of data-parallel rank ``r`` takes the ``micro_batch_size`` positions starting at
``(j * dp_size + r) * micro_batch_size``. So:

* every stream visits each of its samples once per epoch, in an order that differs between epochs;
* the ranks' slices are disjoint and together cover the global batch;
* the state is ``consumed_samples`` and ``n_s`` per stream (global, all ranks together): resuming on
  the same or on a different data-parallel size continues with the next planned position, no repeat,
  no skip (the global batch in samples must stay the same);
* what a rank reads at a step is a function of (seed, step, rank), which makes bit-exact resume
  possible.

Reading goes through random access (``dataset[i]``, e.g. :class:`pretrain.data.shards.TrainSplit`),
with a background thread prefetching the next batches so the model does not wait on data.
"""
from __future__ import annotations

import math
import queue
import threading
import zlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from model.config import IGNORE_INDEX


class RandomAccessSamples(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> np.ndarray: ...


# Other fixed draws from the data seed use stream tags no epoch number reaches: the `seen` validation
# samples (pretrain/evaluation/validation.py), the probe molecules (pretrain/evaluation/probes.py) and
# the choice of the repeated subset.
SEEN_SAMPLE_STREAM, PROBE_MOLECULE_STREAM, REPEAT_SUBSET_STREAM = 2**31 - 1, 2**31 - 2, 2**31 - 3
REPEATED = "repeated"  # the name of the repeated-subset stream


@dataclass(frozen=True)
class Stream:
    """One stream of the mixture: a source's samples, or the repeated subset."""

    name: str  # the source, or REPEATED
    source: str  # the source its samples come from
    ids: np.ndarray  # the samples it walks (indices into the training set)
    weight: float  # its share of each global batch's samples

    @property
    def tag(self) -> int:
        return zlib.crc32(self.name.encode())


def plan_streams(sources: dict[str, np.ndarray], *, mixture: dict[str, float] | None = None,
                 repeat_source: str | None = None, repeat_samples: int = 0, repeat_fraction: float = 0.0,
                 seed: int = 1234) -> list[Stream]:
    """The streams of ``data.mixture`` and ``data.repeat`` over ``sources`` (name → sample indices); a
    setting that cannot work is a ConfigError naming its key."""
    from pretrain.config import ConfigError

    names = ", ".join(sources)
    if not mixture:
        mixture = {name: float(len(ids)) for name, ids in sources.items()}
    for key, w in mixture.items():
        if key not in sources:
            raise ConfigError(f"data.mixture.{key}: no such source in the shards (sources: {names})")
        if not (w >= 0 and math.isfinite(w)):
            raise ConfigError(f"data.mixture.{key}={w}: a weight must be a finite number >= 0")
    total = sum(mixture.values())
    if total <= 0:
        raise ConfigError(f"data.mixture={mixture}: the weights sum to 0; give at least one source a weight")
    ids = dict(sources)
    subset = None
    if repeat_source is not None:
        if repeat_source not in sources:
            raise ConfigError(f"data.repeat.source={repeat_source}: no such source in the shards (sources: {names})")
        n = len(sources[repeat_source])
        if not 1 <= repeat_samples < n:
            raise ConfigError(f"data.repeat.samples={repeat_samples}: must be in [1, {n - 1}] "
                              f"(source {repeat_source} has {n} samples)")
        if not 0 < repeat_fraction < 1:
            raise ConfigError(f"data.repeat.fraction={repeat_fraction}: must be in (0, 1)")
        order = np.random.default_rng([seed, REPEAT_SUBSET_STREAM]).permutation(sources[repeat_source])
        subset, ids[repeat_source] = np.sort(order[:repeat_samples]), np.sort(order[repeat_samples:])
    unique_share = 1.0 - (repeat_fraction if subset is not None else 0.0)
    streams = [Stream(name, name, ids[name], unique_share * mixture[name] / total)  # in the sources' order
               for name in sources if mixture.get(name, 0) > 0]
    if subset is not None:
        streams.append(Stream(REPEATED, repeat_source, subset, repeat_fraction))
    return streams


def samples_per_epoch(streams: Sequence[Stream]) -> int:
    """Global samples per epoch of the fastest-cycling source stream (the repeated subset aside): the
    epoch that epoch boundaries, ``epoch`` and the validation schedule count. With the default mixture
    every source cycles together and this is the training set's size."""
    return max(1, round(min(len(s.ids) / s.weight for s in streams if s.name != REPEATED)))


def epoch_permutation(num_samples: int, seed: int, epoch: int, tag: int = 0) -> np.ndarray:
    """The visiting order of a stream's epoch ``epoch``: a permutation seeded by ``(seed, tag, epoch)``."""
    return np.random.default_rng([seed, tag, epoch]).permutation(num_samples)


def assign(weights: np.ndarray, drawn: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The streams of the next ``count`` global positions after ``drawn`` (samples given per stream so
    far): each goes to the stream furthest behind its share. Returns (stream, position in that stream)
    per global position, and the counts after them."""
    drawn = drawn.copy()
    k = int(drawn.sum())
    which, where = np.empty(count, np.int64), np.empty(count, np.int64)
    for p in range(count):
        s = int(np.argmax(weights * (k + p + 1) - drawn)) if len(weights) > 1 else 0
        which[p], where[p] = s, drawn[s]
        drawn[s] += 1
    return which, where, drawn


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
    sample_ids: np.ndarray  # (micro_batch,) index of each sample in the training set
    epochs: np.ndarray  # (micro_batch,) how many times each sample was seen before this batch
    streams: np.ndarray  # (micro_batch,) the stream each sample came from (index into loader.streams)


class EpochLoader:
    """Yields this rank's micro-batches, one global batch (``grad_accum`` micro-steps) at a time.

    ``state_dict()`` counts only what was handed out by :meth:`next_global_batch`, never what the
    prefetch thread read ahead.
    """

    def __init__(self, samples: RandomAccessSamples, streams: Sequence[Stream] | None = None, *,
                 micro_batch_size: int, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 1234, pad_id: int = 1, prefetch: int = 4):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"micro_batch_size={micro_batch_size} × dp_size={dp_size}")
        if len(samples) == 0:
            raise ValueError("the training set has no samples")
        self.samples = samples
        self.streams = list(streams) if streams else [Stream("train", "train", np.arange(len(samples)), 1.0)]
        self.weights = np.array([s.weight for s in self.streams]) / sum(s.weight for s in self.streams)
        self.num_samples = samples_per_epoch(self.streams)
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.grad_accum = global_batch_size // (micro_batch_size * dp_size)
        self.seed, self.pad_id, self.prefetch = seed, pad_id, prefetch
        self.consumed_samples = 0
        self.drawn = np.zeros(len(self.streams), np.int64)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ---- where we are -------------------------------------------------------------------------
    def passes(self) -> dict[str, float]:
        """Passes over each stream so far (2.5 = half-way through its third epoch)."""
        return {s.name: int(n) / len(s.ids) for s, n in zip(self.streams, self.drawn)}

    @property
    def epoch(self) -> float:
        """Epochs completed of the fastest-cycling source stream, as a fraction."""
        return max(v for k, v in self.passes().items() if k != REPEATED)

    def unique_samples_seen(self) -> int:
        return int(sum(min(int(n), len(s.ids)) for s, n in zip(self.streams, self.drawn)))

    def accounting(self, seq_len: int) -> dict:
        """``source_tokens`` (positions trained on, per source, repeated subset included),
        ``source_epochs`` (passes over each source's own stream) and, with a repeated subset,
        ``repeated_passes``: what the step rows of metrics.jsonl carry."""
        tokens: dict[str, int] = {}
        for s, n in zip(self.streams, self.drawn):
            tokens[s.source] = tokens.get(s.source, 0) + int(n) * seq_len
        passes = self.passes()
        row = {"source_tokens": tokens, "source_epochs": {k: v for k, v in passes.items() if k != REPEATED}}
        if REPEATED in passes:
            row["repeated_passes"] = passes[REPEATED]
        return row

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "streams": {s.name: {"samples": len(s.ids), "drawn": int(n)} for s, n in zip(self.streams, self.drawn)}}

    def load_state_dict(self, state: dict) -> None:
        if "streams" not in state:
            raise ValueError("written by the single-stream loader (shards of the old layout)")
        planned = {s.name: len(s.ids) for s in self.streams}
        saved = {name: v["samples"] for name, v in state["streams"].items()}
        if saved != planned:
            raise ValueError(f"written for the streams {saved} (stream: samples), the config and shards give "
                             f"{planned}: another data.mixture, data.repeat or dataset")
        if state["seed"] != self.seed:
            raise ValueError(f"data.seed={self.seed}, but the checkpoint used data.seed={state['seed']}")
        self._stop_prefetch()
        self.consumed_samples = int(state["consumed_samples"])
        self.drawn = np.array([state["streams"][s.name]["drawn"] for s in self.streams], np.int64)

    # ---- the stream -----------------------------------------------------------------------------
    def _permutation(self, stream: int, epoch: int) -> np.ndarray:
        key = (stream, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 2 * len(self.streams) + 1:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            s = self.streams[stream]
            self._perm_cache[key] = s.ids[epoch_permutation(len(s.ids), self.seed, epoch, s.tag)]
        return self._perm_cache[key]

    def rank_positions(self) -> list[np.ndarray]:
        """Positions, within a global batch, of this rank's micro-batches."""
        mb, dp = self.micro_batch_size, self.dp_size
        return [(j * dp + self.dp_rank) * mb + np.arange(mb) for j in range(self.grad_accum)]

    def _read(self, which: np.ndarray, where: np.ndarray) -> Batch:
        sizes = np.array([len(self.streams[int(s)].ids) for s in which])
        epochs = where // sizes
        ids = np.array([self._permutation(int(s), int(e))[p % n] for s, e, p, n in zip(which, epochs, where, sizes)])
        input_ids, labels = make_batch([self.samples[int(i)] for i in ids], self.pad_id)
        return Batch(input_ids, labels, ids, epochs, which)

    def _global_batch(self, drawn: np.ndarray) -> tuple[list[Batch], np.ndarray]:
        which, where, after = assign(self.weights, drawn, self.global_batch_size)
        return [self._read(which[p], where[p]) for p in self.rank_positions()], after

    # ---- prefetch -------------------------------------------------------------------------------
    def _producer(self, start: int, drawn: np.ndarray) -> None:
        consumed = start
        try:
            while not self._stop.is_set():
                batches, after = self._global_batch(drawn)
                item = (consumed, (batches, after))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                consumed, drawn = consumed + self.global_batch_size, after
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
            batches, after = self._global_batch(self.drawn)
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(target=self._producer, args=(self.consumed_samples, self.drawn.copy()),
                                                daemon=True)
                self._thread.start()
            consumed, item = self._queue.get()
            assert consumed == self.consumed_samples, (consumed, self.consumed_samples)
            if isinstance(item, BaseException):
                raise item
            batches, after = item
        self.consumed_samples += self.global_batch_size
        self.drawn = after
        return batches

    def close(self) -> None:
        self._stop_prefetch()
