"""Reading a run's record, ``RUN_DIR/metrics.jsonl`` (written by pretrain/trainer/metrics.py): light,
so that gal-report and tools load no training stack."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (steps and events), [] if there is none yet."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if n == len(lines):
                    break  # a half-written last line of a killed run
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
    return rows
