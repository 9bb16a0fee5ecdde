"""Validation rounds: per-source held-out loss and the loss on already-seen training data.

Galactica trained 4.25 epochs and saw the validation loss plateau or rise within an epoch and fall
again after it (epoch-wise double descent). To see that while a run goes, a round is evaluated

* every ``validation.interval_tokens`` tokens, by default ``validation.rounds_per_epoch`` (16) evenly
  spaced rounds an epoch (``reason="interval"``),
* at every epoch boundary (``"epoch_boundary"``),
* at ``validation.after_boundary_points`` (4) extra points in the first ``after_boundary_tokens`` after
  each boundary (``"after_boundary"``), where the effect shows first.

That is the density the double-descent detector needs (tests/test_doubledescent_rates.py). The epoch is
the fastest-cycling source's (pretrain/data/loader.py). A round evaluates every held-out set of the
shards (``valid/<source>``) and their token-weighted ``aggregate``, and ``seen/<stream>``: fixed samples
of each source's training stream (``seen``: their aggregate) and of the repeated subset
(``seen/repeated``), whose loss against the held-out loss is the memorisation gap. The sets are fixed
seeded subsets sized so that a round costs at most ``validation.max_cost`` (5%) of the training compute
between rounds; ``validation_s`` in each round's record measures it.
Evaluation is data-parallel (each DP rank takes a slice; sums are all-reduced) and tensor-parallel
like training, in eval mode (no dropout), deterministic. With ``validation.probes`` a round also runs
the chemistry probes (pretrain/evaluation/probes.py: SMILES → formula exact match, SMILES validity).
The rounds' parallel rules (eval mode, DP split, equal forwards) are pretrain/evaluation/lockstep.py.
"""
from __future__ import annotations

import math
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.config import IGNORE_INDEX
from pretrain.config import ValidationConf
from pretrain.data.loader import (REPEATED, SEEN_SAMPLE_STREAM, RandomAccessSamples, Stream, epochs_completed,
                                  make_batch)
from pretrain.data.shards import ShardReader
from pretrain.evaluation import lockstep
from pretrain.evaluation.probes import ChemistryProbes

class ValidationSchedule:
    """When a round is due, from ``tokens_seen`` alone (so a resumed run keeps the same schedule)."""

    def __init__(self, conf: ValidationConf, tokens_per_epoch: int):
        self.conf, self.tokens_per_epoch = conf, tokens_per_epoch
        self.interval = conf.interval_tokens or (max(1, tokens_per_epoch // conf.rounds_per_epoch)
                                                 if conf.rounds_per_epoch > 0 else None)
        after = conf.after_boundary_tokens or (self.interval // 2 if self.interval else tokens_per_epoch // 10)
        points = conf.after_boundary_points
        self.after_offsets = [after * (k + 1) // points for k in range(points)]  # evenly in (0, after]

    @property
    def tokens_between_rounds(self) -> float:
        """Training tokens per round, on average over an epoch (what a round's cost budget is set from)."""
        rounds = (self.tokens_per_epoch / self.interval if self.interval else 1) + len(self.after_offsets)
        return self.tokens_per_epoch / rounds

    def reason(self, before: int, after: int) -> str | None:
        """Why a round is due after a step that moved tokens_seen from ``before`` to ``after``."""
        if not self.conf.enabled:
            return None
        if epochs_completed(before, after, self.tokens_per_epoch):
            return "epoch_boundary"
        epoch = after // self.tokens_per_epoch
        start = epoch * self.tokens_per_epoch
        if epoch > 0 and any(before < start + off <= after for off in self.after_offsets):
            return "after_boundary"
        interval = self.interval
        if interval and after // interval > before // interval:
            return "interval"
        return None


EVAL_TOKENS_PER_TRAIN_TOKEN = 2  # what the round budget assumes an evaluated token costs: half a trained one


class Validator:
    """The sets a round evaluates, fixed at start (the same samples every round, chosen by the data seed):
    ``valid/<source>`` (held-out), ``seen/<stream>`` (training samples of each source's stream and of the
    repeated subset). A round costs at most ``validation.max_cost`` of the training compute between
    rounds. An evaluated token is counted as half a trained one (a third in FLOPs; measured on the CPU,
    small eval batches run at ~2.4× the training tokens/s): each set gets an equal share of that many
    samples, at least one, at most ``max_samples_per_source`` / ``seen_samples``."""

    def __init__(self, conf: ValidationConf, data_path: Path, manifest: dict, train: RandomAccessSamples,
                 streams: list[Stream], *, seed: int, seq_len: int, tokens_between_rounds: float | None):
        self.conf, self.pad_id = conf, manifest.get("pad_id", 1)
        valid = Path(data_path) / "valid"
        dirs = sorted(p for p in valid.iterdir() if (p / "index.json").exists()) if valid.is_dir() else []
        n_sets = len(dirs) + len(streams)
        budget = (math.inf if not tokens_between_rounds or conf.max_cost is None
                  else EVAL_TOKENS_PER_TRAIN_TOKEN * conf.max_cost * tokens_between_rounds / seq_len)
        self.per_set = max(1, int(budget // n_sets)) if math.isfinite(budget) else None
        self.sets: dict[str, tuple[RandomAccessSamples, np.ndarray]] = {}
        for d in dirs:
            reader = ShardReader(d, manifest.get("vocab_size"))
            self.sets[d.name] = (reader, self._pick(np.arange(len(reader)), conf.max_samples_per_source, seed, d.name))
        for s in streams:
            self.sets[f"seen/{s.name}"] = (train, self._pick(s.ids, conf.seen_samples, seed, s.name))
        self.probes = None
        if conf.enabled and conf.probes:
            self.probes = ChemistryProbes(conf, data_path, manifest, seed=seed)
            if not self.probes.records and dist.get_rank() == 0:
                print(f"warning: validation.probes=true but {data_path}/manifest.json lists no held-out molecules "
                      "with a formula (no molecules source, or shards from an older gal-prepare): "
                      "formula_exact_match will be null", file=sys.stderr)

    def _pick(self, ids: np.ndarray, cap: int | None, seed: int, name: str) -> np.ndarray:
        """A fixed seeded subset of ``ids``: the round budget's share, within ``cap``."""
        n = min(len(ids), *(c for c in (cap, self.per_set) if c is not None))
        if n == len(ids):
            return np.asarray(ids)
        rng = np.random.default_rng([seed, SEEN_SAMPLE_STREAM, zlib.crc32(name.encode())])
        return np.sort(rng.choice(ids, n, replace=False))

    @property
    def held_out(self) -> list[str]:
        return [s for s in self.sets if not s.startswith("seen/")]

    @property
    def seen_sources(self) -> list[str]:
        """The sources' own streams (the repeated subset's memorisation is its own series)."""
        return [s for s in self.sets if s.startswith("seen/") and s != f"seen/{REPEATED}"]

    @torch.no_grad()
    def run(self, engine, device) -> dict:
        """One round: {"losses": {set: mean loss}, "tokens": {set: target tokens}} on every rank, with
        ``aggregate`` (held-out) and ``seen`` (the sources' seen sets) token-weighted over their sets."""
        sums = torch.zeros(len(self.sets), 2, dtype=torch.float64)
        mb = self.conf.micro_batch_size
        with lockstep.eval_mode(engine):
            for k, (reader, ids) in enumerate(self.sets.values()):
                mine = lockstep.share(ids)
                for j in range(lockstep.rounds(len(ids), mb)):
                    chunk = mine[j * mb:(j + 1) * mb]
                    real = len(chunk)
                    input_ids, labels = make_batch([reader[int(i)] for i in (chunk if real else ids[:1])], self.pad_id)
                    n = int((labels != IGNORE_INDEX).sum())
                    loss = engine(input_ids.to(device), labels.to(device))
                    if real and n:
                        sums[k, 0] += float(loss) * n
                        sums[k, 1] += n
        sums = lockstep.sum_over_ranks(sums, device)
        losses = {name: float(s / n) if n else None for name, (s, n) in zip(self.sets, sums.tolist())}
        tokens = {name: int(n) for name, (_, n) in zip(self.sets, sums.tolist())}
        for combined, parts in (("aggregate", self.held_out), ("seen", self.seen_sources)):
            parts = [s for s in parts if tokens[s]]
            if parts:
                tokens[combined] = sum(tokens[s] for s in parts)
                losses[combined] = sum(losses[s] * tokens[s] for s in parts) / tokens[combined]
        result = {"losses": losses, "tokens": tokens}
        if self.probes is not None:
            result["probes"] = self.probes.run(engine, device)
        return result
