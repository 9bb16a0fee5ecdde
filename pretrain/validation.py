"""Validation rounds: per-source held-out loss and the loss on already-seen training data.

Galactica trained 4.25 epochs and saw the validation loss plateau or rise within an epoch and fall
again after it (epoch-wise double descent). To see that while a run goes, a round is evaluated

* every ``validation.interval_tokens`` tokens (``reason="interval"``),
* at every epoch boundary (``"epoch_boundary"``),
* at ``validation.after_boundary_points`` extra points in the first ``after_boundary_tokens`` after
  each boundary (``"after_boundary"``), where the effect shows first.

A round evaluates every held-out set of the shards (``valid/<source>/``), a token-weighted
``aggregate`` of them, and ``seen``: a fixed sample of training sequences (the same ones every
round, chosen by the data seed), whose loss against the held-out loss is the memorisation gap.
Evaluation is data-parallel (each DP rank takes a slice; sums are all-reduced) and tensor-parallel
like training, in eval mode (no dropout), deterministic. With ``validation.probes`` a round also runs
the chemistry probes (pretrain/probes.py: SMILES → formula exact match, SMILES validity).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model import parallel
from pretrain import doubledescent
from pretrain.data.loader import IGNORE_INDEX
from pretrain.config import ValidationConf
from pretrain.data.shards import ShardReader
from pretrain.probes import ChemistryProbes


class Validator:
    def __init__(self, conf: ValidationConf, data_path: Path, train: ShardReader, *, seed: int, pad_id: int,
                 tokens_per_epoch: int):
        self.conf, self.pad_id = conf, pad_id
        valid = Path(data_path) / "valid"
        self.sets: dict[str, tuple[ShardReader, np.ndarray]] = {}
        for d in sorted(p for p in valid.iterdir() if (p / "index.json").exists()) if valid.is_dir() else []:
            reader = ShardReader(d)
            n = len(reader) if conf.max_samples_per_source is None else min(len(reader), conf.max_samples_per_source)
            self.sets[d.name] = (reader, np.arange(n))
        probe = np.random.default_rng([seed, 2**31 - 1]).choice(len(train), min(conf.seen_samples, len(train)),
                                                                replace=False)
        self.sets["seen"] = (train, np.sort(probe))
        self.tokens_per_epoch = tokens_per_epoch
        after = conf.after_boundary_tokens or (conf.interval_tokens // 2 if conf.interval_tokens
                                                else tokens_per_epoch // 10)
        points = conf.after_boundary_points
        self.after_offsets = [after * (k + 1) // points for k in range(points)]  # evenly in (0, after]
        self.probes = None
        if conf.enabled and conf.probes:
            manifest = json.loads((Path(data_path) / "manifest.json").read_text())
            self.probes = ChemistryProbes(conf, data_path, manifest, seed=seed)
            if not self.probes.records and dist.get_rank() == 0:
                print(f"warning: validation.probes=true but {data_path}/manifest.json lists no held-out molecules "
                      "with a formula (no molecules source, or shards from an older gal-prepare): "
                      "formula_exact_match will be null", file=sys.stderr)

    @property
    def held_out(self) -> list[str]:
        return [s for s in self.sets if s != "seen"]

    def reason(self, before: int, after: int) -> str | None:
        """Why a round is due after a step that moved tokens_seen from ``before`` to ``after``."""
        if not self.conf.enabled:
            return None
        epoch_b, epoch_a = before // self.tokens_per_epoch, after // self.tokens_per_epoch
        if epoch_a > epoch_b:
            return "epoch_boundary"
        start = epoch_a * self.tokens_per_epoch
        if epoch_a > 0 and any(before < start + off <= after for off in self.after_offsets):
            return "after_boundary"
        interval = self.conf.interval_tokens
        if interval and after // interval > before // interval:
            return "interval"
        return None

    @torch.no_grad()
    def run(self, engine, device) -> dict:
        """One round: {"losses": {set: mean loss}, "tokens": {set: target tokens}} on every rank."""
        module = engine.module
        was_training = module.training
        module.eval()
        sums = torch.zeros(len(self.sets), 2, dtype=torch.float64)
        dp_rank, dp_size, mb = parallel.dp_rank(), parallel.dp_size(), self.conf.micro_batch_size
        for k, (reader, ids) in enumerate(self.sets.values()):
            mine = ids[dp_rank::dp_size]
            # every DP rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)
            steps = math.ceil(math.ceil(len(ids) / dp_size) / mb)
            for j in range(steps):
                chunk = mine[j * mb:(j + 1) * mb]
                real = len(chunk)
                if real == 0:
                    chunk = ids[:1]
                tokens = torch.from_numpy(np.stack([np.asarray(reader[int(i)], dtype=np.int64) for i in chunk]))
                labels = tokens[:, 1:].clone()
                labels[labels == self.pad_id] = IGNORE_INDEX
                n = int((labels != IGNORE_INDEX).sum())
                loss = engine(tokens[:, :-1].to(device), labels.to(device))
                if real and n:
                    sums[k, 0] += float(loss) * n
                    sums[k, 1] += n
        sums = sums.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(sums, group=parallel.dp_group())
        sums = sums.cpu()
        module.train(was_training)
        losses = {name: float(s / n) if n else None for name, (s, n) in zip(self.sets, sums.tolist())}
        tokens = {name: int(n) for name, (_, n) in zip(self.sets, sums.tolist())}
        held = [s for s in self.held_out if tokens[s]]
        if held:
            total = sum(tokens[s] for s in held)
            losses["aggregate"] = sum(losses[s] * tokens[s] for s in held) / total
            tokens["aggregate"] = total
        if self.probes is not None:
            return {"losses": losses, "tokens": tokens, "probes": self.probes.run(engine, device)}
        return {"losses": losses, "tokens": tokens}


class DoubleDescentWatch:
    """Online detection: after each round, :func:`pretrain.doubledescent.from_metrics` on the aggregate
    held-out curve so far; returns the current epoch's verdict when its shape, bump or overfitting onset
    changed, else None. The history is metrics.jsonl itself (so a resumed run keeps it), read
    incrementally: each update parses only the lines appended since the last one."""

    def __init__(self, metrics_path: Path):
        self.path, self.last = metrics_path, None
        self.rows: list[dict] = []  # the validation rounds and epoch ends so far
        self.offset = 0

    def _read_new(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next update
        for line in chunk[:end].splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("event") in ("validation", "epoch_end"):
                    self.rows.append(row)
        self.offset += end

    def update(self) -> dict | None:
        self._read_new()
        result = doubledescent.from_metrics(self.rows)
        if not result.epochs:
            return None
        e = result.epochs[-1]
        key = (e.epoch, e.shape, e.bump_peak_tokens, e.overfitting_onset_tokens, result.overfitting_epoch)
        if key == self.last or e.shape == "too_short":
            return None
        self.last = key
        return {"epoch": e.epoch, "shape": e.shape, "complete": e.complete, "bump_peak_tokens": e.bump_peak_tokens,
                "bump_noise": e.bump_noise, "overfitting_onset_tokens": e.overfitting_onset_tokens,
                "overfitting_since_epoch": result.overfitting_epoch}
