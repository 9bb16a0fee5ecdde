"""The production step (pretrain/trainer/step.py) on 2 CPU ranks: one collective from our code per step,
an all-reduce that carries the data-parallel mean loss and the preemption flag of any rank.
The script is tests/dist/step_allreduces.py (engine from pretrain/trainer/setup.py, real DeepSpeed, gloo)."""
from __future__ import annotations

import json
import math
import re

import pytest

from helpers import REPO, synthetic_shards, torchrun

pytestmark = [pytest.mark.multirank, pytest.mark.trainer]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("step")
    shards = synthetic_shards(root / "shards", seq_len=32, n_samples=64)
    out = root / "out"
    out.mkdir()
    torchrun(2, REPO / "tests" / "dist" / "step_allreduces.py", str(shards), str(out), timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_the_run_is_what_the_script_asked_for(ranks):
    for r, rank in enumerate(ranks):
        assert (rank["rank"], rank["world_size"], rank["grad_accum"], rank["total_steps"], rank["warmup_steps"]) == \
            (r, 2, 2, 4, 2)
        assert [s["step"] for s in rank["steps"]] == [1, 2, 3, 4]
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        # each rank trains on its own 2 of the global batch's 4 sequences
        assert len(s0["samples"]) == len(s1["samples"]) == 2
        mine = [i for b in s0["samples"] + s1["samples"] for i in b]
        assert len(set(mine)) == 4


def test_exactly_one_collective_from_our_code_per_step(ranks):
    lines = set()
    for rank in ranks:
        for s in rank["steps"]:
            assert len(s["project_calls"]) == 1, (rank["rank"], s["step"], s["project_calls"])
            (call,) = s["project_calls"]
            assert re.fullmatch(r"all_reduce pretrain/trainer/step\.py:\d+", call), call
            lines.add(call)
            assert len(s["sent"]) == 1 and len(s["sent"][0]) == 2  # [local loss, signalled]
            # the wrapper sees DeepSpeed's own traffic too (gradient reduction): the filter is what keeps it out
            assert s["library_calls"] > 0
    assert len(lines) == 1, lines


def test_the_step_loss_is_the_mean_over_ranks(ranks):
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    for s0, s1 in zip(steps0[:3], steps1[:3]):
        local0, local1 = s0["sent"][0][0], s1["sent"][0][0]
        assert local0 != local1 and math.isfinite(local0) and math.isfinite(local1)
        assert s0["loss"] == s1["loss"] == (local0 + local1) / 2
        assert s0["skipped"] is None and s1["skipped"] is None
    # the NaN drill of step 4 reads on the global loss: both ranks skip, together
    for s in (steps0[3], steps1[3]):
        assert math.isfinite(s["sent"][0][0]) and math.isnan(s["loss"]) and s["skipped"] == "non-finite loss"
    assert ranks[0]["skipped_steps"] == ranks[1]["skipped_steps"] == 1


def test_one_signalled_rank_stops_both_at_that_step(ranks):
    for rank in ranks:
        assert [s["preempt"] for s in rank["steps"]] == [False, True, False, False]
        assert [s["sent"][0][1] for s in rank["steps"]] == ([0.0, 1.0, 0.0, 0.0] if rank["rank"] == 1 else
                                                           [0.0, 0.0, 0.0, 0.0])


def test_the_rate_of_each_update(ranks):
    # 4 steps, 2 of warmup, lr_max 2e-3 (tiny-2l): update s uses lr_max × lr_lambda(2, 4, 0.1)(s - 1), i.e.
    # 2e-3 × [1/2, 2/2, 1 - 0.9 * 1/2, 1 - 0.9 * 2/2] (the rate of step 4 is read before its NaN drill skips it)
    for rank in ranks:
        assert rank["lr_max"] == 2e-3
        assert [s["lr"] for s in rank["steps"]] == pytest.approx([1e-3, 2e-3, 1.1e-3, 2e-4], rel=1e-12)
