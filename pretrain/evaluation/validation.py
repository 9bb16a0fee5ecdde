"""Validation rounds: per-source held-out loss and the loss on already-seen training data.

Galactica trained 4.25 epochs and saw the validation loss plateau or rise within an epoch and fall
again after it (epoch-wise double descent). To see that while a run goes, a round is evaluated

* every ``validation.interval_tokens`` tokens, by default ``validation.rounds_per_epoch`` (16) evenly
  spaced rounds an epoch (``reason="interval"``),
* at every epoch boundary (``"epoch_boundary"``),
* at ``validation.after_boundary_points`` extra points in the first ``after_boundary_tokens`` after
  each boundary (``"after_boundary"``), where the effect shows first.

A round evaluates every held-out set of the shards (``valid/<source>/``), a token-weighted
``aggregate`` of them, and ``seen``: a fixed sample of training sequences (the same ones every
round, chosen by the data seed), whose loss against the held-out loss is the memorisation gap.
Evaluation is data-parallel (each DP rank takes a slice; sums are all-reduced) and tensor-parallel
like training, in eval mode (no dropout), deterministic. With ``validation.probes`` a round also runs
the chemistry probes (pretrain/evaluation/probes.py: SMILES → formula exact match, SMILES validity).
The rounds' parallel rules (eval mode, DP split, equal forwards) are pretrain/evaluation/lockstep.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.config import IGNORE_INDEX
from pretrain.config import ValidationConf
from pretrain.data.loader import SEEN_SAMPLE_STREAM, epochs_completed, make_batch
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


class Validator:
    def __init__(self, conf: ValidationConf, data_path: Path, manifest: dict, train: ShardReader, *, seed: int):
        self.conf, self.pad_id = conf, manifest.get("pad_id", 1)
        valid = Path(data_path) / "valid"
        self.sets: dict[str, tuple[ShardReader, np.ndarray]] = {}
        for d in sorted(p for p in valid.iterdir() if (p / "index.json").exists()) if valid.is_dir() else []:
            reader = ShardReader(d)
            n = len(reader) if conf.max_samples_per_source is None else min(len(reader), conf.max_samples_per_source)
            self.sets[d.name] = (reader, np.arange(n))
        probe = np.random.default_rng([seed, SEEN_SAMPLE_STREAM]).choice(
            len(train), min(conf.seen_samples, len(train)), replace=False)
        self.sets["seen"] = (train, np.sort(probe))
        self.probes = None
        if conf.enabled and conf.probes:
            self.probes = ChemistryProbes(conf, data_path, manifest, seed=seed)
            if not self.probes.records and dist.get_rank() == 0:
                print(f"warning: validation.probes=true but {data_path}/manifest.json lists no held-out molecules "
                      "with a formula (no molecules source, or shards from an older gal-prepare): "
                      "formula_exact_match will be null", file=sys.stderr)

    @property
    def held_out(self) -> list[str]:
        return [s for s in self.sets if s != "seen"]

    @torch.no_grad()
    def run(self, engine, device) -> dict:
        """One round: {"losses": {set: mean loss}, "tokens": {set: target tokens}} on every rank."""
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
        held = [s for s in self.held_out if tokens[s]]
        if held:
            total = sum(tokens[s] for s in held)
            losses["aggregate"] = sum(losses[s] * tokens[s] for s in held) / total
            tokens["aggregate"] = total
        result = {"losses": losses, "tokens": tokens}
        if self.probes is not None:
            result["probes"] = self.probes.run(engine, device)
        return result
