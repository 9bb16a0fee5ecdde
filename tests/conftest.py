"""Shared test helpers: paths, the shared science corpus, and running code under torchrun."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """The real public science corpus in ../shared/corpus (CI always has it)."""
    if not (SHARED_CORPUS / "arxiv.jsonl").exists():
        pytest.skip(f"the shared science corpus is absent: {SHARED_CORPUS} (CI provides it)")
    return SHARED_CORPUS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str | Path, *args: str, timeout: float = 600, env: dict | None = None):
    """Run `script` under torchrun with `nproc` CPU processes (gloo); fail the test with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), *args]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


def synthetic_shards(root: Path, seq_len: int, n_samples: int, samples_per_shard: int = 16, vocab: int = 256) -> Path:
    """``n_samples`` learnable token ramps (ids 4..253) in real shards under ``root/train``, with a manifest:
    enough for the trainer when no tokenizer is needed."""
    from pretrain.data.shards import ShardWriter
    import json

    rng = np.random.default_rng(0)
    w = ShardWriter(root / "train", seq_len + 1, np.uint16, samples_per_shard=samples_per_shard)
    for i in range(n_samples):
        toks = (rng.integers(4, 100) + np.arange(seq_len + 1) * (i % 5 + 1)) % 250 + 4
        w.write(toks.astype(np.uint16), {"doc_ids": [f"d{i}"], "sources": ["syn"], "doc_starts": [0], "pad_tokens": 0})
    w.close()
    (root / "manifest.json").write_text(json.dumps({"vocab_size": vocab, "pad_id": 1}))
    return root
