"""Double descent along a sweep axis (pretrain/analysis/sweep.py) and `gal-report SWEEP_DIR`."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from helpers import cli_error, write_run
from pretrain.analysis.sweep import AxisConfig, analyse, detect_axis, swept_keys, load_points
from pretrain.report import main

SIGMA = 0.01  # noise of a final loss in the rate tests
AXIS = [1, 4, 16, 64, 256, 1024]


def test_a_peak_along_the_axis_is_double_descent_and_a_slope_is_not():
    got = detect_axis(AXIS, [4.44, 4.46, 4.50, 4.53, 4.49, 4.47], [0.005] * 6)
    assert got["shape"] == "double_descent" and got["peak_index"] == 3
    assert got["rise_noise"] == pytest.approx((4.53 - 4.44) / 0.005) and got["fall_noise"] == pytest.approx((4.53 - 4.47) / 0.005)
    assert detect_axis(AXIS, [4.4, 4.45, 4.5, 4.55, 4.6, 4.65], [0.005] * 6)["shape"] == "rising"
    assert detect_axis(AXIS, [4.65, 4.6, 4.55, 4.5, 4.45, 4.4], [0.005] * 6)["shape"] == "falling"
    assert detect_axis(AXIS, [4.5, 4.501, 4.499, 4.5, 4.5, 4.501], [0.005] * 6)["shape"] == "flat"
    assert detect_axis([1, 2], [4.5, 4.6], [0.005] * 2)["shape"] == "too_short"
    # the order of the points does not matter: they are sorted along the axis
    shuffled = detect_axis(AXIS[::-1], [4.47, 4.49, 4.53, 4.50, 4.46, 4.44], [0.005] * 6)
    assert shuffled["shape"] == "double_descent" and shuffled["peak_index"] == 2


@pytest.mark.parametrize("peak", [2, 3, 4])
def test_a_6_sigma_peak_is_found_in_at_least_90_percent_of_seeded_sweeps(peak):
    rng = np.random.default_rng(peak)
    bump = np.zeros(len(AXIS))
    bump[peak] = 6 * SIGMA
    found = [detect_axis(AXIS, 4.5 + bump + rng.normal(0, SIGMA, len(AXIS)), [SIGMA] * len(AXIS))["shape"]
             == "double_descent" for _ in range(500)]
    assert np.mean(found) >= 0.90, np.mean(found)


@pytest.mark.parametrize("slope", [0.0, 0.3, -0.3])
def test_a_monotone_noisy_sweep_is_flagged_in_at_most_5_percent(slope):
    rng = np.random.default_rng(7)
    base = 4.5 + slope * SIGMA * np.arange(len(AXIS))
    flagged = [detect_axis(AXIS, base + rng.normal(0, SIGMA, len(AXIS)), [SIGMA] * len(AXIS))["shape"]
               == "double_descent" for _ in range(1000)]
    assert np.mean(flagged) <= 0.05, np.mean(flagged)


def write_point(sweep, name: str, overrides: list[str], offset: float) -> None:
    """A write_run run directory with Hydra's overrides file; its held-out curves shifted by ``offset``."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    rows = write_run(run)
    for r in rows:
        if r.get("event") == "validation":
            r["losses"] = {k: v + offset if k != "seen" else v for k, v in r["losses"].items()}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for name, r, offset in (("0", 1, 0.0), ("1", 16, 0.08), ("2", 256, 0.02)):
        write_point(root, name, ["model=tiny-2l", f"data.repeat_times={r}", "trainer.max_tokens=1000"], offset)
    return root


def test_gal_report_on_a_multirun_directory_writes_the_sweep_figure_and_summary(sweep, capsys):
    main([str(sweep)])
    out = sweep / "report"
    assert {p.name for p in out.iterdir()} == {"sweep.png", "summary.json", "summary.md"}
    assert (out / "sweep.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["key"] == "data.repeat_times" and summary["x"] == [1.0, 16.0, 256.0]
    assert summary["shape"] == "double_descent" and summary["peak_x"] == 16.0
    finals = summary["final_loss"]
    assert finals[1] - finals[0] == pytest.approx(0.08, abs=0.02) and finals[1] > finals[2] > finals[0]
    assert "**Verdict along the axis: double_descent** (peak at data.repeat_times=16.0" in (out / "summary.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_the_axis_is_the_one_swept_key_or_must_be_named(sweep, tmp_path, capsys):
    assert swept_keys(load_points(sweep)) == ["data.repeat_times"]
    write_point(sweep, "3", ["model=tiny", "data.repeat_times=64", "trainer.max_tokens=1000"], 0.05)
    with pytest.raises(ValueError, match="2 swept keys .*--axis"):
        analyse(sweep)
    assert analyse(sweep, "data.repeat_times").x == [1.0, 16.0, 64.0, 256.0]
    with pytest.raises(ValueError, match="--axis seed: neither swept"):
        analyse(sweep, "seed")
    assert re.search("gal-report: error: .*--axis", cli_error(capsys, main, [str(sweep)]))


def test_a_sweep_point_without_hydra_overrides_is_named(sweep):
    (sweep / "1" / ".hydra" / "overrides.yaml").unlink()
    with pytest.raises(ValueError, match=r"1/\.hydra/overrides\.yaml is missing"):
        load_points(sweep)


@pytest.mark.trainer
def test_gal_report_on_a_real_three_point_multirun_of_repeated_subsets(tmp_path):
    """gal-train -m (Hydra's basic launcher, one point after another) over data.repeat.samples, then
    gal-report SWEEP_DIR along the measured repeated_passes: the figure, the summary, every point's curve."""
    import subprocess

    from helpers import BIN, REPO, TRAIN_COMMON, synthetic_shards, train_env

    shards = synthetic_shards(tmp_path / "shards", 32, {"big": 40, "small": 12}, valid={"big": 8})
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([str(BIN / "gal-train"), "-m", f"data.path={shards}", f"run_dir={sweep_dir}", *TRAIN_COMMON,
                           "logger.wandb=false", "logger.console=false", "trainer.max_tokens=1536",
                           "validation.interval_tokens=256", "data.repeat.source=big", "data.repeat.fraction=0.5",
                           "data.repeat.samples=1,3,12"],
                          cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    proc = subprocess.run([str(BIN / "gal-report"), str(sweep_dir), "--axis", "repeated_passes"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((sweep_dir / "report" / "summary.json").read_text())
    # 12 steps × 4 samples, half of them from the subset: 24 draws over 12, 3 and 1 samples
    assert summary["key"] == "repeated_passes" and summary["x"] == [2.0, 8.0, 24.0]
    assert summary["shape"] in {"double_descent", "rising", "falling", "flat"} and len(summary["final_loss"]) == 3
    assert all(s is not None for s in summary["final_seen"])  # the repeated subset's seen loss
    assert (sweep_dir / "report" / "sweep.png").stat().st_size > 10_000
    assert "| 24.0 |" in (sweep_dir / "report" / "summary.md").read_text()
