"""gal-report on a synthetic 3-epoch metrics.jsonl written in the training loop's row format."""
import json
import re
import math
import struct
import subprocess
import sys

import pytest

from helpers import REPORT_EPOCH as EPOCH, cli_error, held_out, write_run
from pretrain.report import R_STAR_D, effective_tokens, main


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_three_epochs(tmp_path, capsys):
    write_run(tmp_path)
    main([str(tmp_path)])
    out = tmp_path / "report"
    printed = capsys.readouterr().out
    for name in ("double_descent.png", "summary.json", "summary.md"):
        assert str(out / name) in printed
    w, h = png_size(out / "double_descent.png")
    assert 800 <= w <= 3000 and 600 <= h <= 3000
    assert (out / "double_descent.png").stat().st_size > 20_000

    summary = json.loads((out / "summary.json").read_text())
    assert summary["unique_tokens"] == EPOCH and summary["r_star_d"] == R_STAR_D
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and [e["repeat"] for e in epochs] == [0, 1, 2]
    assert all(e["complete"] for e in epochs)
    keys = {"loss_start", "loss_end", "loss_min", "gap_end", "shape", "bump", "overfitting_onset_tokens",
            "effective_tokens", "repeat", "start_tokens", "end_tokens"}
    assert all(keys <= e.keys() for e in epochs)
    assert [e["shape"] for e in epochs] == ["monotone", "descent_ascent_descent", "descent_ascent_descent"]
    for e in epochs[1:]:
        assert abs(e["bump"]["peak_tokens"] - (e["epoch"] - 0.5) * EPOCH) < 0.1 * EPOCH
    # the gap at the end of each epoch: the aggregate minus the seen loss of the last round
    assert epochs[2]["gap_end"] == pytest.approx(held_out(3.0) - (2.9 - 0.45 * 3), abs=0.03)
    assert epochs[0]["loss_min"] <= epochs[0]["loss_end"] <= epochs[0]["loss_start"]
    # effective data: the first epoch is all unique; then Muennighoff et al.'s exponential decay
    assert epochs[0]["effective_tokens"] == pytest.approx(EPOCH)
    for k, e in enumerate(epochs, 1):
        expect = EPOCH + EPOCH * 15.4 * (1 - math.exp(-(k - 1) / 15.4))
        assert e["effective_tokens"] == pytest.approx(expect)
        assert e["effective_tokens"] < k * EPOCH or k == 1
    assert summary["detection"]["pubchem"]["epochs"][1]["shape"] == "descent_ascent_descent"

    md = (out / "summary.md").read_text()
    assert "Muennighoff" in md and "1 - exp(-R_D / R*_D)" in md and "15.4" in md
    assert md.count("descent_ascent_descent") >= 2


def test_effective_tokens_limits():
    assert effective_tokens(0.5 * EPOCH, EPOCH) == pytest.approx(0.5 * EPOCH)  # within epoch 1: all unique
    assert effective_tokens(1000 * EPOCH, EPOCH) == pytest.approx(EPOCH * (1 + R_STAR_D), rel=1e-6)
    four = effective_tokens(4 * EPOCH, EPOCH)
    assert 0.9 * 4 * EPOCH < four < 4 * EPOCH  # up to ~4 epochs repeated data is worth almost as much


def test_running_run_with_half_written_last_line(tmp_path):
    rows = write_run(tmp_path)
    # cut the run in the middle of epoch 3, inside a half-written row
    cut = next(i for i, r in enumerate(rows) if r.get("epoch", 0) > 2.5 and r.get("event") == "validation")
    text = "".join(json.dumps(r) + "\n" for r in rows[:cut]) + json.dumps(rows[cut])[:40]
    (tmp_path / "metrics.jsonl").write_text(text)
    main([str(tmp_path), "--out", str(tmp_path / "elsewhere")])
    summary = json.loads((tmp_path / "elsewhere" / "summary.json").read_text())
    assert [(e["epoch"], e["complete"]) for e in summary["epochs"]] == [(1, True), (2, True), (3, False)]
    assert png_size(tmp_path / "elsewhere" / "double_descent.png")[0] > 0
    assert "(running)" in (tmp_path / "elsewhere" / "summary.md").read_text()


def test_errors_name_the_path(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    assert re.search(f"{path}: no such metrics file", cli_error(capsys, main, [str(tmp_path)]))
    path.write_text("")
    assert re.search(f"{path}: empty", cli_error(capsys, main, [str(tmp_path)]))
    path.write_text(json.dumps({"step": 1, "tokens_seen": 10, "epoch": 0.1, "loss": 3.0}) + "\n")
    assert re.search(f"{path}: no validation rows", cli_error(capsys, main, [str(tmp_path)]))
    assert not (tmp_path / "report").exists()


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "pretrain.report", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "RUN_DIR" in r.stdout.upper() and "--out" in r.stdout
