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
    path.write_text(json.dumps({"event": "start", "step": 0, "tokens_seen": 0}) + "\n")
    assert re.search(f"{path}: no training step or validation round yet", cli_error(capsys, main, [str(tmp_path)]))
    assert not (tmp_path / "report").exists()


# ----------------------------------------------------------------------------- the figure's content
def draw(rows):
    """The report figure of ``rows`` and its axes by label (overview, series:<name>)."""
    from pretrain.analysis.curves import figure
    from pretrain.report import summarise

    summary = summarise(rows)
    fig = figure(rows, summary)
    return fig, {ax.get_label(): ax for ax in fig.axes}, summary


def lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def training_losses(rows) -> list[float]:
    return [r["loss"] for r in rows if "event" not in r]


def test_figure_training_loss_unclipped_sources_on_their_own_scale_and_only_the_markers_drawn(tmp_path):
    import matplotlib.pyplot as plt

    rows = write_run(tmp_path)
    fig, axes, summary = draw(rows)
    # the overview, then one panel per source and one of the aggregate: nothing else (no repeated panel)
    assert sorted(axes) == ["overview", "series:aggregate", "series:arxiv", "series:pubchem"]
    overview = axes["overview"]
    low, high = overview.get_ylim()
    losses = training_losses(rows)
    assert low <= min(losses) and max(losses) <= high  # the training loss is not clipped
    drawn = lines(overview)
    assert list(drawn["training loss (each step)"].get_ydata()) == losses
    assert {"held-out arxiv", "held-out pubchem", "held-out aggregate (token-weighted)", "seen (trained-on samples)",
            "epoch end"} <= set(legend(overview))
    # no source hides under the aggregate: other colours, and the aggregate on top but see-through
    aggregate = drawn["held-out aggregate (token-weighted)"]
    for source in ("held-out arxiv", "held-out pubchem"):
        assert drawn[source].get_color() != aggregate.get_color()
        assert aggregate.get_alpha() < 1 and aggregate.get_zorder() > drawn[source].get_zorder()
    assert len({drawn[s].get_color() for s in ("held-out arxiv", "held-out pubchem")}) == 2
    # epoch boundaries on every axis
    for ax in axes.values():
        assert sum(1 for line in ax.get_lines() if line.get_linestyle() == ":") == 3
    # the legend has a marker only where one was drawn: bumps in epochs 2 and 3, no overfitting
    panel = axes["series:pubchem"]
    assert legend(panel) == ["held-out pubchem", "bump peak"]
    assert len(panel.collections) == sum(e["bump_peak_tokens"] is not None
                                         for e in summary["detection"]["pubchem"]["epochs"]) == 2
    assert not any("overfitting" in label for ax in axes.values() for label in legend(ax))
    # a panel starts at its first validation round: no empty stretch before it
    first = next(r for r in rows if r.get("event") == "validation")
    assert panel.get_xlim()[0] == pytest.approx(first["tokens_seen"] / EPOCH)
    plt.close(fig)


def test_a_fresh_models_round_widens_the_overview_and_the_panels_zoom_past_the_first_epoch(tmp_path):
    """validation.at_start's round at step 0 (loss 6, twice the rest's range): the overview shows it, the
    panels leave the first epoch's fall out so that the later bumps stay visible, and start where they zoom."""
    import matplotlib.pyplot as plt

    rows = write_run(tmp_path)
    rows.insert(1, {"event": "validation", "step": 0, "tokens_seen": 0, "epoch": 0.0, "repeat": 0, "reason": "start",
                    "losses": {"arxiv": 6.0, "pubchem": 5.8, "aggregate": 5.95, "seen": 6.0},
                    "tokens": {"arxiv": 6000, "pubchem": 2000, "aggregate": 8000, "seen": 4000}})
    fig, axes, _ = draw(rows)
    assert axes["overview"].get_ylim()[1] >= 6.0
    assert axes["overview"].get_xlim()[0] == 0
    for name in ("aggregate", "arxiv", "pubchem"):
        panel = axes[f"series:{name}"]
        assert panel.get_ylim()[1] < 3.5 and "the first epoch's fall is in the top panel" in panel.get_title()
        later = [r["losses"][name] for r in rows if r.get("event") == "validation" and r["epoch"] >= 1]
        assert panel.get_ylim()[0] < min(later) and max(later) < panel.get_ylim()[1]
        assert 0 < panel.get_xlim()[0] < 1
    plt.close(fig)


def test_one_source_is_not_drawn_twice_as_the_aggregate(tmp_path):
    import matplotlib.pyplot as plt

    rows = write_run(tmp_path, epochs=2, rounds_per_epoch=10)
    for r in rows:
        if r.get("event") == "validation":
            r["losses"] = {"arxiv": r["losses"]["arxiv"], "aggregate": r["losses"]["arxiv"],
                           "seen/arxiv": r["losses"]["seen"], "seen": r["losses"]["seen"]}
    fig, axes, _ = draw(rows)
    assert sorted(axes) == ["overview", "series:arxiv"]
    assert "held-out arxiv (= aggregate)" in legend(axes["overview"])
    assert not any("aggregate (token-weighted)" in label for label in legend(axes["overview"]))
    assert legend(axes["series:arxiv"])[:2] == ["held-out arxiv (= aggregate)", "seen arxiv"]
    plt.close(fig)


def test_a_run_without_validation_rows_gets_its_training_curve(tmp_path, capsys):
    rows = [r for r in write_run(tmp_path) if r.get("event") != "validation"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main([str(tmp_path)])
    png = tmp_path / "report" / "double_descent.png"
    assert str(png) in capsys.readouterr().out and png_size(png)[0] > 800
    assert "training loss only" in (tmp_path / "report" / "summary.md").read_text()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["epochs"] == [] and summary["training_loss"]["steps_logged"] == len(training_losses(rows))

    import matplotlib.pyplot as plt

    fig, axes, _ = draw(rows)
    assert list(axes) == ["overview"]
    assert list(lines(axes["overview"])["training loss (each step)"].get_ydata()) == training_losses(rows)
    assert "no validation rows" in axes["overview"].get_title()
    plt.close(fig)


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "pretrain.report", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "RUN_DIR" in r.stdout.upper() and "--out" in r.stdout
