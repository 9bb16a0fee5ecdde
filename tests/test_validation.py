"""Validation rounds in a real 3-epoch run at the default schedule on real (small) shards, and the report
built from them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import BIN, REPO, torchrun, wandb_history
from pretrain.analysis.records import read_metrics

# every test needs the module's 3-epoch training run (gal-prepare, then gal-train)
pytestmark = [pytest.mark.trainer, pytest.mark.slow]


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    shards, run = root / "shards", root / "run"
    env = {"OMP_NUM_THREADS": "2", "PATH": f"{BIN}:/usr/bin:/bin"}
    prep = subprocess.run([sys.executable, "-m", "pretrain.prepare", "max_docs_per_file=120", "shards.seq_len=128",
                           "tokenizer.vocab_size=1000", f"output={shards}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert prep.returncode == 0, prep.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", f"data.path={shards}", f"run_dir={run}",
                           "model=tiny-2l", "trainer.global_batch_tokens=4096", "trainer.micro_batch_size=8", "trainer.max_epochs=3",
                           "optim.warmup_tokens=8192", "validation.seen_samples=16", "logger.wandb=true",
                           "deepspeed.precision=bf16"],  # validation and the detector on the GPU's precision path
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return shards, run


def test_rounds_at_every_epoch_boundary_per_source_and_seen(three_epochs):
    shards, run = three_epochs
    rows = read_metrics(run / "metrics.jsonl")
    rounds = [r for r in rows if r.get("event") == "validation"]
    sources = sorted(p.name for p in (shards / "valid").iterdir())
    assert sources == ["docstrings", "molecules"]
    boundary = [r for r in rounds if r["reason"] == "epoch_boundary"]
    assert [r["repeat"] for r in boundary] == [1, 2, 3]  # after epochs 1, 2 and 3
    ends = [e["step"] for e in rows if e.get("event") == "epoch_end"]
    assert [r["step"] for r in boundary] == ends
    seen = [f"seen/{s}" for s in sources]
    for r in rounds:
        assert set(r["losses"]) == {*sources, "aggregate", *seen, "seen"}
        for combined, parts in (("aggregate", sources), ("seen", seen)):
            mean = sum(r["losses"][s] * r["tokens"][s] for s in parts) / sum(r["tokens"][s] for s in parts)
            assert r["losses"][combined] == pytest.approx(mean)
        assert r["tokens"] == rounds[0]["tokens"]  # the same fixed samples every round
    # the fixed sets are the round budget's equal shares: 82,432 tokens an epoch, 20 rounds (16 + 4 after the
    # boundary), so 2 × 0.05 × 4,122 / 128 = 3.2 samples a round over 4 sets: one sample each
    for name in (*sources, *seen):
        assert 0 < rounds[0]["tokens"][name] <= 128, name  # one sample of 128 targets (less its padding)
    # 16 rounds an epoch at least (the 4 after-boundary points may fall inside the boundary's step)
    for start, end in zip([0, *ends], ends):
        assert sum(1 for r in rounds if start < r["step"] <= end + 1) >= 16, (start, end)
    assert all(r["validation_s"] > 0 for r in rounds)  # what each round cost
    assert any(r["reason"] == "interval" for r in rounds)
    # the model learns: held-out and seen losses at the last boundary are below the first round's
    assert boundary[-1]["losses"]["aggregate"] < rounds[0]["losses"]["aggregate"]
    assert boundary[-1]["losses"]["seen"] < rounds[0]["losses"]["seen"]


def test_online_detection_events_in_metrics_and_wandb_and_the_report(three_epochs):
    _, run = three_epochs
    rows = read_metrics(run / "metrics.jsonl")
    verdicts = [r for r in rows if r.get("event") == "double_descent"]
    assert verdicts and all(v["series"] == "aggregate" and v["epoch"] in (1, 2, 3) for v in verdicts)
    assert all(v["shape"] != "too_short" for v in verdicts)  # the default schedule gives the detector its rounds
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    logged = [h for h in history if "double_descent/epoch" in h]
    assert [h["double_descent/epoch"] for h in logged] == [v["epoch"] for v in verdicts]
    assert any("source_tokens/docstrings" in h for h in history)  # nested step fields, flattened

    proc = subprocess.run([sys.executable, "-m", "pretrain.report", str(run)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = run / "report" / "double_descent.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3]
    assert "Muennighoff" in (run / "report" / "summary.md").read_text()


@pytest.mark.multirank
def test_a_checkpoint_validates_to_the_same_numbers_on_1_and_2_data_parallel_ranks(three_epochs, tmp_path):
    """validation.at_start on the finished run's checkpoint, with the chemistry probes on: the same losses
    (to fp32 rounding: 1 and 2 ranks group samples into different micro batches) and identical probe
    results on 1 and on 2 data-parallel ranks (2 ranks load it as a universal checkpoint)."""
    shards, run = three_epochs
    args = [f"data.path={shards}", f"resume={run / 'checkpoints'}", "model=tiny-2l",
            "trainer.global_batch_tokens=4096", "trainer.micro_batch_size=8", "trainer.max_epochs=3",
            "optim.warmup_tokens=8192", "validation.seen_samples=16", "logger.wandb=false",
            "validation.at_start=true", "validation.probes=true", "validation.probe_molecules=4",
            "validation.probe_smiles_samples=3", "validation.probe_max_new_tokens=8",
            "validation.probe_smiles_max_new_tokens=16", "checkpoint.keep_last=1"]
    rounds = {}
    for nproc in (1, 2):
        out = tmp_path / f"dp{nproc}"
        torchrun(nproc, REPO / "pretrain" / "train.py", *args, f"run_dir={out}", timeout=600)
        (row,) = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "validation"]
        start = next(r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "start")
        assert (row["reason"], start["dp_size"], start["resumed"]) == ("start", nproc, True)
        rounds[nproc] = row
    one, two = rounds[1], rounds[2]
    assert one["step"] == two["step"] > 0 and one["tokens"] == two["tokens"]
    assert set(one["losses"]) == set(two["losses"]) >= {"aggregate", "seen"}
    for name, loss in one["losses"].items():
        assert two["losses"][name] == pytest.approx(loss, rel=1e-6, abs=0), name
    assert one["probes"] == two["probes"] and one["probes"]["formula_molecules"] == 4
