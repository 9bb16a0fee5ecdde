"""Source mixtures and repeated subsets (pretrain/data/loader.py): shares, passes, determinism, resume."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import synthetic_shards
from pretrain.config import ConfigError
from pretrain.data.loader import REPEATED, EpochLoader, assign, plan_streams, samples_per_epoch
from pretrain.data.shards import ShardWriter, TrainSplit

SOURCES = {"arxiv": np.arange(0, 300), "proteins": np.arange(300, 350)}  # 300 and 50 samples


class Samples:
    def __len__(self):
        return 350

    def __getitem__(self, i):
        return np.full(5, 100 + i, dtype=np.uint16)


def run(streams, steps, gbs=8, **kw):
    loader = EpochLoader(Samples(), streams, micro_batch_size=2, global_batch_size=gbs, prefetch=0, **kw)
    batches = [loader.next_global_batch() for _ in range(steps)]
    return loader, batches


def test_a_mixture_gives_each_source_its_share_in_every_prefix():
    streams = plan_streams(SOURCES, mixture={"arxiv": 0.8, "proteins": 0.2})
    loader, batches = run(streams, 200)
    acc = loader.accounting(seq_len=4)
    tokens = acc["source_tokens"]
    assert tokens["arxiv"] + tokens["proteins"] == 200 * 8 * 4
    assert abs(tokens["arxiv"] / (200 * 8 * 4) - 0.8) < 0.01 and tokens["arxiv"] == 1280 * 4  # exact here
    # every prefix of the global stream is within one sample of the shares
    which = np.concatenate([np.concatenate([b.streams for b in bs]) for bs in batches])
    counts = np.cumsum(which == 1)
    assert np.abs(counts - 0.2 * np.arange(1, len(which) + 1)).max() < 1
    # the small source (50 samples at 0.2 of 1,600) went round 6.4 times, the big one 4.27 times
    assert acc["source_epochs"] == pytest.approx({"arxiv": 1280 / 300, "proteins": 320 / 50})
    # each source walks its own epochs: every sample once per pass, a new order each pass
    ids = np.concatenate([np.concatenate([b.sample_ids for b in bs]) for bs in batches])
    small = ids[which == 1]
    passes = [small[k * 50:(k + 1) * 50] for k in range(6)]
    assert all(sorted(p) == list(range(300, 350)) for p in passes)
    assert not np.array_equal(passes[0], passes[1])
    assert loader.epoch == pytest.approx(320 / 50)  # the fastest-cycling source's passes


def test_the_default_mixture_is_proportional_to_size():
    streams = plan_streams(SOURCES)
    assert [s.weight for s in streams] == pytest.approx([300 / 350, 50 / 350])
    assert samples_per_epoch(streams) == 350  # every source cycles together: the training set's size
    loader, _ = run(streams, 350 // 10, gbs=10)
    assert loader.accounting(seq_len=1)["source_epochs"] == pytest.approx({"arxiv": 1.0, "proteins": 1.0})


def test_a_repeated_subset_is_seen_the_planned_number_of_times_and_never_in_the_unique_stream():
    streams = plan_streams(SOURCES, repeat_source="arxiv", repeat_samples=5, repeat_fraction=0.25, seed=3)
    subset = next(s for s in streams if s.name == REPEATED).ids
    unique = next(s for s in streams if s.name == "arxiv").ids
    assert len(subset) == 5 and len(unique) == 295 and not set(subset) & set(unique)
    loader, batches = run(streams, 200)
    planned = 200 * 8 * 0.25 / 5  # 80 passes
    acc = loader.accounting(seq_len=4)
    assert abs(acc["repeated_passes"] - planned) <= 1
    ids = np.concatenate([np.concatenate([b.sample_ids for b in bs]) for bs in batches])
    which = np.concatenate([np.concatenate([b.streams for b in bs]) for bs in batches])
    rep = [k for k, s in enumerate(streams) if s.name == REPEATED][0]
    assert set(ids[which == rep]) == set(subset)
    assert not set(ids[which != rep]) & set(subset)
    # the subset's tokens count to its source
    assert acc["source_tokens"]["arxiv"] == int((which != 1).sum()) * 4
    # another seed, another subset
    other = plan_streams(SOURCES, repeat_source="arxiv", repeat_samples=5, repeat_fraction=0.25, seed=4)
    assert not np.array_equal(other[-1].ids, subset)


def test_resume_on_another_dp_size_continues_the_planned_stream():
    streams = plan_streams(SOURCES, mixture={"arxiv": 0.8, "proteins": 0.2}, repeat_source="proteins",
                           repeat_samples=3, repeat_fraction=0.1)
    _, straight = run(streams, 30)
    want = [sorted(np.concatenate([b.sample_ids for b in bs]).tolist()) for bs in straight]
    two = [EpochLoader(Samples(), streams, micro_batch_size=2, global_batch_size=8, dp_rank=r, dp_size=2, prefetch=2)
           for r in range(2)]
    got = []
    for _ in range(12):
        got.append(sorted(i for ld in two for b in ld.next_global_batch() for i in b.sample_ids.tolist()))
    state = two[0].state_dict()
    assert two[1].state_dict() == state and state["consumed_samples"] == 96
    for ld in two:
        ld.close()
    one = EpochLoader(Samples(), streams, micro_batch_size=4, global_batch_size=8, prefetch=3)
    one.load_state_dict(state)
    got += [sorted(i for b in one.next_global_batch() for i in b.sample_ids.tolist()) for _ in range(18)]
    one.close()
    assert got == want


def test_assign_is_exact_in_integers_at_large_counts():
    weights = np.array([0.7, 0.2, 0.1])
    drawn = np.array([7_000_000_000, 2_000_000_000, 1_000_000_000])
    which, where, after = assign(weights, drawn, 10)
    assert np.bincount(which, minlength=3).tolist() == [7, 2, 1]
    assert after.tolist() == [7_000_000_007, 2_000_000_002, 1_000_000_001]


@pytest.mark.parametrize("kw, message", [
    (dict(mixture={"chemistry": 1.0}), r"data.mixture.chemistry: no such source .*\(sources: arxiv, proteins\)"),
    (dict(mixture={"arxiv": -1.0}), r"data.mixture.arxiv=-1.0: a weight must be a finite number >= 0"),
    (dict(mixture={"arxiv": 0.0}), r"the weights sum to 0"),
    (dict(repeat_source="dna", repeat_samples=3, repeat_fraction=0.1), r"data.repeat.source=dna: no such source"),
    (dict(repeat_source="proteins", repeat_samples=50, repeat_fraction=0.1), r"data.repeat.samples=50: must be in \[1, 49\]"),
    (dict(repeat_source="proteins", repeat_samples=3, repeat_fraction=1.0), r"data.repeat.fraction=1.0: must be in \(0, 1\)"),
])
def test_bad_mixtures_name_their_key(kw, message):
    with pytest.raises(ConfigError, match=message):
        plan_streams(SOURCES, **kw)


def test_a_checkpoint_of_another_mixture_is_refused():
    a = EpochLoader(Samples(), plan_streams(SOURCES), micro_batch_size=2, global_batch_size=8, prefetch=0)
    b = EpochLoader(Samples(), plan_streams(SOURCES, repeat_source="arxiv", repeat_samples=5, repeat_fraction=0.2),
                    micro_batch_size=2, global_batch_size=8, prefetch=0)
    with pytest.raises(ValueError, match="another data.mixture, data.repeat or dataset"):
        b.load_state_dict(a.state_dict())


def test_train_split_indexes_sources_in_name_order_and_refuses_the_old_layout(tmp_path):
    root = synthetic_shards(tmp_path / "new", seq_len=8, n_samples={"b": 5, "a": 3}, samples_per_shard=4)
    train = TrainSplit(root)
    assert train.sources == ["a", "b"] and len(train) == 8 and train.ids("b").tolist() == [3, 4, 5, 6, 7]
    assert np.array_equal(train[3], train.readers["b"][0]) and train.locate(2) == ("a", 2)
    old = tmp_path / "old"
    w = ShardWriter(old / "train", 9, np.uint16)
    w.write(np.arange(9, dtype=np.uint16), {"doc_ids": ["x"], "sources": ["s"], "doc_starts": [0], "pad_tokens": 0})
    w.close()
    with pytest.raises(ConfigError, match=r"old layout .* gal-prepare input=<your JSONL> output=.*old overwrite=true"):
        TrainSplit(old)


def test_the_plan_does_not_depend_on_the_order_the_mixture_is_written_in():
    a = plan_streams(SOURCES, mixture={"arxiv": 0.8, "proteins": 0.2})
    b = plan_streams(SOURCES, mixture={"proteins": 0.2, "arxiv": 0.8})
    assert [(s.name, s.weight) for s in a] == [(s.name, s.weight) for s in b]
