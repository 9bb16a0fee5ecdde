"""Online double-descent detection while a run trains (offline: pretrain/report.py)."""
from __future__ import annotations

import json
from pathlib import Path

from pretrain.analysis import doubledescent


class DoubleDescentWatch:
    """Online detection: after each round, :func:`pretrain.analysis.doubledescent.from_metrics` on the aggregate
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
