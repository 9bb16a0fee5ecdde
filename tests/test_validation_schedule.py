"""When validation rounds fall (pretrain/evaluation/validation.py's ValidationSchedule): whole runs
enumerated step by step, with the exact (tokens_seen, reason) list."""
from __future__ import annotations

import pytest

from pretrain.config import ValidationConf
from pretrain.evaluation.validation import ValidationSchedule

EPOCH = 1000  # tokens per epoch in these runs


def explicit(**kw) -> ValidationConf:
    """A schedule set by hand: no evenly spaced rounds and 2 points after a boundary unless given."""
    return ValidationConf(**{"rounds_per_epoch": 0, "after_boundary_points": 2, **kw})


def test_dense_is_16_rounds_an_epoch_and_4_right_after_each_boundary():
    dense = ValidationConf()  # the default
    sched = ValidationSchedule(dense, 1600)  # interval 100; 4 points in its first half (50)
    assert sched.interval == 100 and sched.after_offsets == [12, 25, 37, 50]
    got = rounds(dense, 1, 2 * 1600, epoch=1600)
    assert got == ([(100 * k, "interval") for k in range(1, 16)] + [(1600, "epoch_boundary")]
                   + [(1600 + o, "after_boundary") for o in (12, 25, 37, 50)]
                   + [(1600 + 100 * k, "interval") for k in range(1, 16)] + [(3200, "epoch_boundary")])
    # an explicit interval replaces the per-epoch rounds; 0 rounds an epoch leaves the boundaries only
    assert ValidationSchedule(ValidationConf(interval_tokens=300), 1600).interval == 300
    assert ValidationSchedule(ValidationConf(rounds_per_epoch=0), 1600).interval is None  # boundaries only
    # 16 rounds + 1 boundary round shared with one + 4 after it: 20 rounds an epoch (the cost budget's unit)
    assert sched.tokens_between_rounds == 1600 / 20


def rounds(conf: ValidationConf, step_tokens: int, total: int, epoch: int = EPOCH, start: int = 0):
    """Every (tokens_seen after the step, reason) of a run from ``start`` to ``total`` tokens."""
    sched = ValidationSchedule(conf, epoch)
    out = []
    for before in range(start, total, step_tokens):
        reason = sched.reason(before, before + step_tokens)
        if reason:
            out.append((before + step_tokens, reason))
    return out


def test_intervals_boundaries_and_points_after_each_boundary():
    conf = explicit(interval_tokens=300)  # after_boundary_tokens: half an interval (150), 2 points
    assert ValidationSchedule(conf, EPOCH).after_offsets == [75, 150]
    assert rounds(conf, 50, 3 * EPOCH) == [
        (300, "interval"), (600, "interval"), (900, "interval"),
        (1000, "epoch_boundary"), (1100, "after_boundary"), (1150, "after_boundary"),  # 1075 falls in 1050→1100
        (1200, "interval"), (1500, "interval"), (1800, "interval"),
        (2000, "epoch_boundary"), (2100, "after_boundary"), (2150, "after_boundary"),  # 2100 is an interval too
        (2400, "interval"), (2700, "interval"),
        (3000, "epoch_boundary")]


def test_without_interval_points_after_boundaries_only():
    conf = explicit()  # no interval: after_boundary_tokens is a tenth of an epoch (100)
    assert ValidationSchedule(conf, EPOCH).after_offsets == [50, 100]
    # nothing in the first epoch: its start is no boundary
    assert rounds(conf, 50, 3 * EPOCH + 200) == [
        (1000, "epoch_boundary"), (1050, "after_boundary"), (1100, "after_boundary"),
        (2000, "epoch_boundary"), (2050, "after_boundary"), (2100, "after_boundary"),
        (3000, "epoch_boundary"), (3050, "after_boundary"), (3100, "after_boundary")]


def test_after_boundary_points_are_evenly_spaced():
    conf = explicit(after_boundary_points=4, after_boundary_tokens=400)
    assert ValidationSchedule(conf, EPOCH).after_offsets == [100, 200, 300, 400]
    assert rounds(conf, 50, 2 * EPOCH) == [(1000, "epoch_boundary"), (1100, "after_boundary"),
                                           (1200, "after_boundary"), (1300, "after_boundary"),
                                           (1400, "after_boundary"), (2000, "epoch_boundary")]
    # an explicit after_boundary_tokens wins over half the interval
    conf = explicit(interval_tokens=500, after_boundary_points=3, after_boundary_tokens=90)
    assert ValidationSchedule(conf, EPOCH).after_offsets == [30, 60, 90]
    assert rounds(conf, 10, 2 * EPOCH) == [(500, "interval"), (1000, "epoch_boundary"), (1030, "after_boundary"),
                                           (1060, "after_boundary"), (1090, "after_boundary"), (1500, "interval"),
                                           (2000, "epoch_boundary")]


def test_coarse_steps_take_one_round_for_several_points():
    conf = explicit()  # points at +50 and +100
    assert rounds(conf, 250, 3 * EPOCH) == [(1000, "epoch_boundary"), (1250, "after_boundary"),
                                            (2000, "epoch_boundary"), (2250, "after_boundary"),
                                            (3000, "epoch_boundary")]


def test_steps_not_aligned_with_the_epoch():
    # 300-token steps: boundaries fall inside steps (900→1200, 1800→2100, 2700→3000 exactly)
    conf = explicit(interval_tokens=400, after_boundary_tokens=500)  # points at +250, +500
    assert rounds(conf, 300, 3000) == [
        (600, "interval"), (900, "interval"),  # 400 in 300→600, 800 in 600→900
        (1200, "epoch_boundary"),  # crosses 1000 (and 1200, an interval)
        (1500, "after_boundary"),  # 1250 and 1500 both in 1200→1500: one round
        (1800, "interval"),  # 1600
        (2100, "epoch_boundary"),
        (2400, "after_boundary"), (2700, "after_boundary"),  # 2250, 2500
        (3000, "epoch_boundary")]


def test_a_step_longer_than_an_epoch_is_a_boundary():
    sched = ValidationSchedule(explicit(interval_tokens=100), EPOCH)
    assert sched.reason(900, 2100) == "epoch_boundary"
    assert sched.reason(0, EPOCH) == "epoch_boundary"
    assert sched.reason(0, EPOCH - 1) == "interval"


def test_a_resumed_run_keeps_the_schedule():
    conf = explicit(interval_tokens=300)
    whole = rounds(conf, 50, 3 * EPOCH)
    resumed = rounds(conf, 50, 1100) + rounds(conf, 50, 3 * EPOCH, start=1100)
    assert resumed == whole


@pytest.mark.parametrize("conf", [explicit(enabled=False), explicit(enabled=False, interval_tokens=100)])
def test_disabled_never(conf):
    assert rounds(conf, 50, 4 * EPOCH) == []
    assert ValidationSchedule(conf, EPOCH).reason(900, 1100) is None


def test_no_points_after_the_boundary():
    conf = explicit(interval_tokens=500, after_boundary_points=0)
    assert rounds(conf, 100, 2 * EPOCH) == [(500, "interval"), (1000, "epoch_boundary"), (1500, "interval"),
                                            (2000, "epoch_boundary")]


def test_a_round_costs_at_most_max_cost_of_the_training_between_rounds(tmp_path):
    """The fixed sets: equal shares of 2 × max_cost × tokens between rounds (an evaluated token costs half a
    trained one), at least one sample each, within seen_samples and the held-out set's size."""
    import numpy as np

    from helpers import synthetic_shards
    from pretrain.data.loader import plan_streams
    from pretrain.data.shards import ShardWriter, TrainSplit
    from pretrain.evaluation.validation import Validator

    root = synthetic_shards(tmp_path, seq_len=8, n_samples={"a": 300, "b": 100})
    for source, n in (("a", 50), ("b", 500)):
        w = ShardWriter(root / "valid" / source, 9, np.uint16)
        for i in range(n):
            w.write(np.full(9, 5, np.uint16), {"doc_ids": [f"v{i}"], "sources": [source], "doc_starts": [0], "pad_tokens": 0})
        w.close()
    train = TrainSplit(root)
    streams = plan_streams({s: train.ids(s) for s in train.sources}, repeat_source="a", repeat_samples=10,
                           repeat_fraction=0.2)
    sched = ValidationSchedule(ValidationConf(), 16 * 4000)  # 4,000 samples of 8 tokens an epoch (20 rounds)

    def sizes(**kw):
        v = Validator(ValidationConf(**kw), root, {"pad_id": 1}, train, streams, seed=1, seq_len=8,
                      tokens_between_rounds=sched.tokens_between_rounds)
        return {name: len(ids) for name, (_, ids) in v.sets.items()}

    # 2 × 0.05 × 3,200 tokens / 8 = 40 samples a round over 5 sets: 8 each
    assert sizes() == {"a": 8, "b": 8, "seen/a": 8, "seen/b": 8, "seen/repeated": 8}
    assert sizes(max_cost=0.5) == {"a": 50, "b": 80, "seen/a": 32, "seen/b": 32, "seen/repeated": 10}
    assert sizes(max_cost=0.001) == {"a": 1, "b": 1, "seen/a": 1, "seen/b": 1, "seen/repeated": 1}  # at least one
    assert sizes(max_cost=None, max_samples_per_source=200) == {"a": 50, "b": 200, "seen/a": 32, "seen/b": 32,
                                                                 "seen/repeated": 10}
    # fixed: the same samples for the same seed, other ones for another
    v1 = Validator(ValidationConf(), root, {"pad_id": 1}, train, streams, seed=1, seq_len=8, tokens_between_rounds=3200)
    v2 = Validator(ValidationConf(), root, {"pad_id": 1}, train, streams, seed=1, seq_len=8, tokens_between_rounds=3200)
    v3 = Validator(ValidationConf(), root, {"pad_id": 1}, train, streams, seed=2, seq_len=8, tokens_between_rounds=3200)
    assert all(np.array_equal(v1.sets[k][1], v2.sets[k][1]) for k in v1.sets)
    assert not np.array_equal(v1.sets["b"][1], v3.sets["b"][1])
    assert set(v1.sets["seen/repeated"][1]) < set(streams[-1].ids)  # 8 of the subset's 10
