"""The training loader: epochs, data-parallel slices, exact resume (also onto another DP size)."""
import numpy as np
import pytest

from pretrain.data.loader import IGNORE_INDEX, EpochLoader


class ArraySamples:
    """Sample i is [i, i, ..., i] with one pad at the end when i is odd (a real shard's last sample)."""

    def __init__(self, n, seq=9):
        self.n, self.seq = n, seq

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = np.full(self.seq, 100 + i, dtype=np.uint16)
        if i % 2:
            x[-1] = 1
        return x


def take(loader, steps):
    """Sample ids and epochs this rank consumed, in order."""
    ids, epochs = [], []
    for _ in range(steps):
        for b in loader.next_global_batch():
            ids += b.sample_ids.tolist()
            epochs += b.epochs.tolist()
    return ids, epochs


@pytest.mark.parametrize("prefetch", [0, 3])
def test_epochs_cover_every_sample_once_in_a_new_order(prefetch):
    n, gbs = 24, 6
    loader = EpochLoader(ArraySamples(n), micro_batch_size=3, global_batch_size=gbs, prefetch=prefetch)
    ids, epochs = take(loader, 3 * n // gbs)
    loader.close()
    per_epoch = [ids[e * n:(e + 1) * n] for e in range(3)]
    for e, seen in enumerate(per_epoch):
        assert sorted(seen) == list(range(n))
        assert epochs[e * n:(e + 1) * n] == [e] * n
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]
    assert loader.epoch == 3.0


def test_inputs_labels_shift_and_padding_is_ignored():
    loader = EpochLoader(ArraySamples(4), micro_batch_size=4, global_batch_size=4, prefetch=0)
    (b,) = loader.next_global_batch()
    assert b.input_ids.shape == b.labels.shape == (4, 8)
    for row, sid in enumerate(b.sample_ids):
        assert (b.input_ids[row] == 100 + sid).all()
        assert b.labels[row, -1].item() == (IGNORE_INDEX if sid % 2 else 100 + sid)
    assert int((b.labels != IGNORE_INDEX).sum()) == 4 * 8 - 2


def test_ranks_are_disjoint_and_cover_the_global_batch():
    n, gbs = 40, 8
    per_rank = []
    for r in range(2):
        loader = EpochLoader(ArraySamples(n), micro_batch_size=2, global_batch_size=gbs, dp_rank=r, dp_size=2, prefetch=0)
        per_rank.append(take(loader, n // gbs)[0])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))


def test_resume_mid_epoch_on_another_dp_size_consumes_each_sample_once():
    n, gbs = 36, 4  # 9 steps an epoch
    first = [EpochLoader(ArraySamples(n), micro_batch_size=1, global_batch_size=gbs, dp_rank=r, dp_size=2)
             for r in range(2)]
    seen = []
    for loader in first:
        seen += take(loader, 5)[0]
        loader.close()
    state = first[0].state_dict()
    assert state["consumed_samples"] == 20 and first[1].state_dict() == state

    resumed = EpochLoader(ArraySamples(n), micro_batch_size=2, global_batch_size=gbs, dp_size=1)
    resumed.load_state_dict(state)
    ids, epochs = take(resumed, 4)
    resumed.close()
    assert sorted(seen + ids) == list(range(n)) and set(epochs) == {0}
    assert resumed.epoch == 1.0


def test_resume_gives_the_identical_batches():
    kw = dict(micro_batch_size=2, global_batch_size=4, seed=7)
    straight = EpochLoader(ArraySamples(10), **kw)
    want = take(straight, 7)[0]
    interrupted = EpochLoader(ArraySamples(10), **kw)
    got = take(interrupted, 3)[0]
    again = EpochLoader(ArraySamples(10), **kw)
    again.load_state_dict(interrupted.state_dict())
    got += take(again, 4)[0]
    for ld in (straight, interrupted, again):
        ld.close()
    assert got == want


def test_bad_configuration_and_foreign_state_are_refused():
    with pytest.raises(ValueError, match="global_batch_size=10 is not divisible"):
        EpochLoader(ArraySamples(10), micro_batch_size=2, global_batch_size=10, dp_size=2)
    loader = EpochLoader(ArraySamples(10), micro_batch_size=2, global_batch_size=4)
    with pytest.raises(ValueError, match="another data.mixture, data.repeat or dataset"):
        loader.load_state_dict({**loader.state_dict(), "streams": {"train": {"samples": 12, "drawn": 0}}})


def test_a_failing_read_surfaces_in_the_training_process():
    class Broken(ArraySamples):
        def __getitem__(self, i):
            raise OSError(f"shard-000003.tar: truncated at sample {i}")

    loader = EpochLoader(Broken(8), micro_batch_size=2, global_batch_size=2, prefetch=2)
    with pytest.raises(OSError, match="shard-000003.tar"):
        loader.next_global_batch()
    loader.close()
