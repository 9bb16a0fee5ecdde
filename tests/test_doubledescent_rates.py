"""Detection rates of pretrain/analysis/doubledescent.py at the default validation density, on seeded
synthetic curves with the noise of a real run.

Density: the default (conf/validation/default.yaml): 16 rounds an epoch plus 4 in the first 32nd of
an epoch after each boundary. Noise: sigma = 0.0105 nats, the round-to-round noise measured on
the held-out curve of docs/experiments/repeat_small (summary.json "noise"). Each curve has 4 epochs
falling 0.25/e nats in epoch e (a slowing descent, 24 sigma in epoch 1 and 6 in epoch 4); the shapes
below are added to epochs 2-4, and every such epoch counts once.
"""
from __future__ import annotations

import numpy as np
import pytest

from pretrain.analysis.doubledescent import detect
from pretrain.config import ValidationConf
from pretrain.evaluation.validation import ValidationSchedule

EPOCH, EPOCHS, STEP = 32_000, 4, 250  # tokens per epoch and per step
SIGMA = 0.0105
TRIALS = 150
BUMPS = ("descent_ascent_descent", "boundary_ascent_descent")
DENSE = ValidationConf()  # the default: 16 rounds an epoch + 4 after each boundary


def default_rounds() -> np.ndarray:
    """tokens_seen of every round the default schedule runs over the 4 epochs."""
    sched, out = ValidationSchedule(DENSE, EPOCH), []
    for before in range(0, EPOCHS * EPOCH, STEP):
        if sched.reason(before, before + STEP):
            out.append(before + STEP)
    return np.array(out, dtype=np.float64)


T = default_rounds()
BOUNDARIES = [EPOCH * (e + 1) for e in range(EPOCHS)]


def curve(kind: str, rng: np.random.Generator, height: float = 6.0) -> np.ndarray:
    y, level = np.empty_like(T), 5.0
    for e in range(EPOCHS):
        at = (T > e * EPOCH) & (T <= (e + 1) * EPOCH)
        u, drop = T[at] / EPOCH - e, 0.25 / (e + 1)
        base = level - drop * u
        rise = height * SIGMA
        if e and kind == "bump":  # falls to a min at a, rises by `height` sigma until a + w, then falls
            a, w = rng.uniform(0.2, 0.45), rng.uniform(0.15, 0.3)
            up = rise + drop * w
            y[at] = base + np.where(u <= a + w, np.clip((u - a) / w, 0, 1) * up, up - 2 * drop * (u - a - w))
        elif e and kind == "after":  # rises by `height` sigma over the first tenth, falls back by 0.4
            up = rise + drop * 0.1
            y[at] = base + np.where(u <= 0.1, u / 0.1, np.clip(1 - (u - 0.1) / 0.3, 0, 1)) * up
        elif e and kind == "galactica":  # flat, then rising late by `height` sigma; the next epoch falls again
            y[at] = level - drop * np.minimum(u, 0.4) + np.clip((u - 0.6) / 0.4, 0, 1) * rise
        else:
            y[at] = base
        level = base[-1] if kind in ("after", "galactica") else y[at][-1]
    return y + rng.normal(0, SIGMA, len(T))


def shapes(kind: str, seed: int, **kw) -> list[str]:
    rng = np.random.default_rng(seed)
    return [e.shape for _ in range(TRIALS) for e in detect(T, curve(kind, rng, **kw), BOUNDARIES).epochs[1:]]


def test_the_dense_schedule_gives_the_detector_enough_rounds():
    epoch_of_round = np.searchsorted(BOUNDARIES, T, side="left")  # a boundary round closes its epoch
    assert list(np.bincount(epoch_of_round)) == [16, 20, 20, 20]  # 16 evenly spaced, plus 4 after each boundary


def test_a_6_sigma_within_epoch_bump_is_found_in_90_percent_of_epochs():
    got = shapes("bump", 0)
    assert np.mean([s in BUMPS for s in got]) >= 0.90
    assert np.mean([s == "descent_ascent_descent" for s in got]) >= 0.80  # and named as within the epoch


def test_a_6_sigma_rise_right_after_the_boundary_is_found_in_90_percent_of_epochs():
    got = shapes("after", 1)
    assert np.mean([s in BUMPS for s in got]) >= 0.90
    assert np.mean([s == "boundary_ascent_descent" for s in got]) >= 0.80  # and named as after the boundary


def test_galactica_rise_late_then_fall_after_the_boundary_is_epoch_wise_double_descent():
    rng = np.random.default_rng(2)
    got = [detect(T, curve("galactica", rng), BOUNDARIES).epochs[1:3] for _ in range(TRIALS)]
    # epochs 2 and 3 end rising and the next epoch undoes it; epoch 4 has no next epoch to judge it by
    assert np.mean([e.shape == "epoch_wise_double_descent" for pair in got for e in pair]) >= 0.90
    assert all(e.overfitting_onset_tokens is None for pair in got for e in pair
               if e.shape == "epoch_wise_double_descent")


@pytest.mark.parametrize("seed", [3, 4])
def test_a_monotone_noisy_curve_is_flagged_in_at_most_5_percent_of_epochs(seed):
    got = shapes("none", seed)
    assert np.mean([s != "monotone" for s in got]) <= 0.05


def test_an_overfitting_run_is_overfitting():
    """Held-out falls through epoch 2, then rises 0.1 nats an epoch while the seen loss keeps falling."""
    rng = np.random.default_rng(5)
    flagged = 0
    for _ in range(TRIALS):
        u = T / EPOCH
        held = np.where(u <= 2, 5.0 - 0.3 * u, 5.0 - 0.6 + 0.1 * (u - 2)) + rng.normal(0, SIGMA, len(T))
        seen = 5.0 - 0.4 * u + rng.normal(0, SIGMA, len(T))
        r = detect(T, held, BOUNDARIES, seen_losses=seen)
        flagged += r.overfitting_epoch == 2 and r.epochs[2].shape == "ascending"
    assert flagged / TRIALS >= 0.90
