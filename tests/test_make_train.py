"""`make train`, the README's first command, as CI runs it: the loss must clearly fall."""
import json
import subprocess

import pytest

from helpers import REPO


@pytest.mark.slow
@pytest.mark.trainer
@pytest.mark.timeout(1800)  # ~4 min on an idle 2-core machine; far longer when the cores are shared
def test_make_train_finishes_and_the_loss_falls(tmp_path):
    run_dir, shards = tmp_path / "run", tmp_path / "shards"
    proc = subprocess.run(["make", "-s", "train", f"TRAIN_RUN_DIR={run_dir}", f"SAMPLE_SHARDS={shards}"],
                          cwd=REPO, capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "event" not in r]
    assert [e["epoch"] for e in rows if e.get("event") == "epoch_end"] == [1, 2]
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 2.0, (first, last)  # from ~ln(8000) = 9.0 to well below 7
    assert (run_dir / "checkpoints" / "latest").exists()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run_dir / "report" / "double_descent.png").stat().st_size > 10_000  # make train ends with gal-report
    assert "epoch_end" in proc.stdout
    # quiet: no third-party start-up noise or warnings on the console (it is in train.log)
    console = proc.stdout + proc.stderr
    for noise in ("Warning", "warnings.warn", "Transformer Engine", "Setting accelerator", "-laio", "built successfully",
                  "Detected Megatron Core"):
        assert noise not in console, noise
    assert "Transformer Engine and Apex are not installed" in (run_dir / "train.log").read_text()
