"""wandb as a researcher meets it (pretrain/trainer/metrics.py): the mode obeys WANDB_MODE and a `wandb login`,
a wandb that cannot start never stops training, and the run's events are in the offline run file.

Real wandb throughout, offline or against an address where nothing listens; no mocks. The trainer runs are
3 steps of the tiny-2l model on synthetic shards (tests/helpers.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, events, steps, synthetic_shards, train, train_env, wandb_records

FAKE_KEY = "0123456789abcdef" * 3  # 48 characters: a well-formed key that no server knows
SHORT_RUN = ["trainer.max_tokens=384", "validation.enabled=false", "logger.wandb=true"]  # 3 steps, 2 an epoch


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("shards"), 32, 8)


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def the_offline_run_file(run: Path) -> Path:
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert not list((run / "wandb").glob("run-*")), "an online run folder was left behind"
    return run_file


@pytest.mark.trainer
def test_wandb_mode_offline_wins_over_a_key_and_the_events_are_read_back(shards, tmp_path):
    run = tmp_path / "run"
    proc = train(1, run, shards, *SHORT_RUN, extra_env={"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"})
    assert not warnings(proc.stderr)
    records = wandb_records(the_offline_run_file(run))

    logged = [e for e in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if "event" in e]
    names = [e["event"] for e in logged]
    assert {"start", "epoch_end", "checkpoint", "done"} <= set(names)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    # each event is a history row with its marker, at its tokens_seen
    markers = [(k.removeprefix("event/"), h["tokens_seen"]) for h in history for k in h if k.startswith("event/")]
    assert markers == [(e["event"], e["tokens_seen"]) for e in logged]
    # the whole list as the `events` table, logged at the end (its file is in the offline run's files/)
    (table_row,) = [h for h in history if h.get("events._type") == "table-file"]
    table = json.loads((the_offline_run_file(run).parent / "files" / table_row["events.path"]).read_text())
    assert table["columns"] == ["event", "step", "tokens_seen", "epoch", "details"]
    assert [row[0] for row in table["data"]] == names
    (epoch_end,) = [row for row in table["data"] if row[0] == "epoch_end"]
    assert epoch_end[1:4] == [2, 256, 1]
    # and the last of each in the summary
    summary = {k: v for r in records if r["type"] == "summary" for k, v in r["summary"].get("update", {}).items()}
    assert summary["done/last"]["step"] == 3


@pytest.mark.trainer
def test_an_unreachable_wandb_server_warns_once_and_the_run_goes_on_offline(shards, tmp_path):
    run = tmp_path / "run"
    proc = train(1, run, shards, *SHORT_RUN, "logger.init_timeout_s=5",
                 extra_env={"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    found = warnings(proc.stderr)
    assert len(found) == 1, proc.stderr  # one warning: the offline start succeeded
    warning = found[0]
    assert "wandb did not start online" in warning and "logger.mode=offline" in warning
    assert FAKE_KEY not in proc.stderr + proc.stdout
    assert [r["step"] for r in steps(run)] == [1, 2, 3] and events(run, "done")  # metrics.jsonl complete
    history = [r["history"]["item"] for r in wandb_records(the_offline_run_file(run)) if r["type"] == "history"]
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx([r["loss"] for r in steps(run)], rel=1e-6)


@pytest.mark.trainer
def test_wandb_mode_disabled_writes_no_wandb_files(shards, tmp_path):
    run = tmp_path / "run"
    proc = train(1, run, shards, *SHORT_RUN, extra_env={"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "disabled"})
    assert not warnings(proc.stderr)
    assert events(run, "done")
    assert not (run / "wandb").exists() and not (run / "wandb_run_id").exists()


MODES = """
import os
from pretrain.trainer.metrics import wandb_mode

print("no key, no login:", wandb_mode("auto"))
print("explicit:", wandb_mode("online"), wandb_mode("disabled"))
os.environ["WANDB_MODE"] = "offline"
print("WANDB_MODE over logger.mode:", wandb_mode("online"))
os.environ["WANDB_MODE"] = "dryrun"
print("dryrun:", wandb_mode("auto"))
del os.environ["WANDB_MODE"]
os.environ["WANDB_API_KEY"] = "%s"
print("a key:", wandb_mode("auto"))
del os.environ["WANDB_API_KEY"]
os.environ["NETRC"] = os.environ["LOGGED_IN_NETRC"]
print("wandb login:", wandb_mode("auto"))
""" % FAKE_KEY


def test_logger_mode_auto_follows_wandb_mode_a_key_and_a_wandb_login(tmp_path):
    """In a fresh process, from the cheapest case to a `wandb login` (a netrc entry, as `wandb login` writes it):
    wandb caches a login it has found for the rest of the process."""
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    env = {**train_env(), "HOME": str(tmp_path), "LOGGED_IN_NETRC": str(netrc)}
    proc = subprocess.run([sys.executable, "-c", MODES], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stdout.splitlines() if ":" in line] == [
        "no key, no login: offline", "explicit: online disabled", "WANDB_MODE over logger.mode: offline",
        "dryrun: offline", "a key: online", "wandb login: online"]
    (warning,) = warnings(proc.stderr)
    assert warning == ("warning: logger.mode=online ignored: WANDB_MODE=offline is set and wins "
                       "(unset it to use logger.mode)")


def test_logger_mode_is_checked_by_name():
    from helpers import train_cfg
    from pretrain.config import ConfigError, model_preset, validate

    cfg = train_cfg("logger.mode=onilne", "trainer.global_batch_tokens=128", "trainer.max_tokens=256")
    with pytest.raises(ConfigError, match=r"^logger\.mode='onilne' must be auto, online, offline or disabled$"):
        validate(cfg, seq_len=32, model_cfg=model_preset("tiny-2l", vocab_size=256), world_size=1)
