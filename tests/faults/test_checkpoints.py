"""Which checkpoint a resume takes and which ones pruning may delete (pretrain/trainer/checkpoint.py),
on tag directories written by hand: a lost or damaged ``latest`` loses nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.trainer.checkpoint import (COMPLETE, LATEST, META, PRUNING, Lineage, complete_tags, find_latest,
                                         is_complete)


def tag(ckpt: Path, step: int, complete: bool = True, marker: bool = True) -> str:
    name = f"step{step:08d}"
    d = ckpt / name
    (d / "zero").mkdir(parents=True)
    (d / "zero" / "optim.pt").write_bytes(b"x" * 100)
    if complete:
        (d / META).write_text("{}")
        if marker:
            files = {"zero/optim.pt": 100, META: 2}
            (d / COMPLETE).write_text(json.dumps({"files": files}))
    return name


@pytest.fixture
def ckpt(tmp_path):
    c = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        tag(c, step)
    tag(c, 8, complete=False)  # a write killed before its marker
    (c / LATEST).write_text("step00000006")
    return c


def test_latest_is_used_when_it_names_a_complete_checkpoint(ckpt):
    assert find_latest(ckpt) == ("step00000006", None)
    assert complete_tags(ckpt) == ["step00000002", "step00000004", "step00000006"]


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.unlink(), "is missing"),
    (lambda p: p.write_text(""), "is empty or unreadable"),
    (lambda p: p.write_bytes(b"\xff\xfe garbage \x00"), "is empty or unreadable"),
    (lambda p: p.write_text("step00000099"), "names 'step00000099', which is not a checkpoint there"),
    (lambda p: p.write_text("step00000008"), "names 'step00000008', which is incomplete (no gal_complete.json"),
])
def test_a_lost_or_damaged_latest_falls_back_to_the_newest_complete_checkpoint(ckpt, damage, why):
    damage(ckpt / LATEST)
    got, reason = find_latest(ckpt)
    assert got == "step00000006" and why in reason


def test_a_truncated_file_makes_its_checkpoint_incomplete(ckpt):
    (ckpt / "step00000006" / "zero" / "optim.pt").write_bytes(b"x" * 40)
    assert not is_complete(ckpt / "step00000006")
    path = ckpt / "step00000006" / "zero" / "optim.pt"
    assert find_latest(ckpt) == ("step00000004", f"{ckpt / LATEST} names 'step00000006', which is damaged: "
                                                 f"{path} is 40 bytes, 100 when written (truncated?)")
    path.unlink()
    assert find_latest(ckpt)[1].endswith(f"which is damaged: {path} is missing")


def test_a_checkpoint_from_before_markers_counts_when_its_layout_file_is_there(tmp_path):
    c = tmp_path / "c"
    tag(c, 3, marker=False)
    tag(c, 5, complete=False)
    assert complete_tags(c) == ["step00000003"]


def test_pruning_keeps_the_newest_of_the_runs_own_line_and_drops_killed_writes(ckpt):
    lineage = Lineage(resumed_from="step00000004")  # the run resumed from step 4 (step 6 is newer: not its own)
    tag(ckpt, 10)
    lineage.written.append("step00000010")
    assert sorted(lineage.prune(ckpt, keep_last=1)) == ["step00000002", "step00000004", "step00000008"]
    assert complete_tags(ckpt) == ["step00000006", "step00000010"]  # step 6 survives any keep_last


def test_a_pruning_cut_short_by_a_kill_leaves_no_half_deleted_tag(ckpt):
    # the kill drill found one: a tag whose deletion a SIGKILL stopped, its marker gone, under its own name
    lineage = Lineage(resumed_from="step00000006")
    tag(ckpt, 10)
    lineage.written.append("step00000010")
    (ckpt / (PRUNING + "step00000001") / "zero").mkdir(parents=True)  # what such a kill leaves now
    assert lineage.prune(ckpt, keep_last=2) == ["step00000002", "step00000004", "step00000008"]
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000006", "step00000010"]


def test_a_fresh_start_never_deletes_the_checkpoints_already_there(ckpt):
    lineage = Lineage(resumed_from=None)  # resume=none in a directory that holds checkpoints
    tag(ckpt, 1)
    lineage.written.append("step00000001")
    tag(ckpt, 3)
    lineage.written.append("step00000003")
    assert lineage.prune(ckpt, keep_last=1) == ["step00000001", "step00000008"]
    assert complete_tags(ckpt) == ["step00000002", "step00000003", "step00000004", "step00000006"]
