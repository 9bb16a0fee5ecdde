"""The loss guard and preemption flag (pretrain/trainer/guards.py) and the fault drills
(pretrain/trainer/faults.py), in this process: no engine, no process group."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest

from helpers import REPO
from pretrain.config import ConfigError, TrainerConf
from pretrain.trainer.faults import KILL_ENV, PAUSE_ENV, Drills
from pretrain.trainer.guards import LossGuard, Preemption, TrainState


def guard(factor=2.0, beta=0.5, warmup=3) -> LossGuard:
    return LossGuard(TrainerConf(loss_spike_factor=factor, loss_ewma_beta=beta, loss_spike_warmup_steps=warmup),
                     TrainState())


def feed(g: LossGuard, loss: float) -> str | None:
    bad = g.is_bad(loss)
    g.update(loss, bad)
    return bad


def counters(s: TrainState) -> tuple:
    return s.loss_ewma, s.ewma_steps, s.skipped_steps, s.consecutive_skips


# ----------------------------------------------------------------------------- the loss guard
@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_is_bad_from_the_first_step(loss):
    g = guard()
    assert g.is_bad(loss) == "non-finite loss"
    g.update(loss, g.is_bad(loss))
    assert counters(g.state) == (None, 0, 1, 1)
    assert feed(g, 3.0) is None
    assert counters(g.state) == (3.0, 1, 1, 0)  # the EWMA starts at the first good loss, not the NaN


def test_ewma_and_the_spike_branch():
    g = guard(factor=2.0, beta=0.5, warmup=3)
    assert g.state.loss_ewma is None
    assert feed(g, 4.0) is None and counters(g.state) == (4.0, 1, 0, 0)
    assert feed(g, 2.0) is None and counters(g.state) == (3.0, 2, 0, 0)  # 0.5 × 4 + 0.5 × 2
    # before loss_spike_warmup_steps good steps, no loss is a spike however large
    assert g.is_bad(1e6) is None
    assert feed(g, 3.0) is None and counters(g.state) == (3.0, 3, 0, 0)
    # from now on: bad above factor × EWMA = 6.0 (strictly)
    assert g.is_bad(6.0) is None
    reason = g.is_bad(6.5)
    assert reason == "loss spike (6.5 > 2.0 × EWMA 3)"
    g.update(6.5, reason)
    assert counters(g.state) == (3.0, 3, 1, 1)  # the EWMA does not learn from a rejected loss
    assert feed(g, 100.0).startswith("loss spike (100 > 2.0 × EWMA 3)")
    assert feed(g, math.nan) == "non-finite loss"
    assert counters(g.state) == (3.0, 3, 3, 3)
    # a good step ends the run of skips; skipped_steps keeps counting the whole run
    assert feed(g, 5.0) is None
    assert counters(g.state) == (4.0, 4, 3, 0)
    assert feed(g, 8.5) == "loss spike (8.5 > 2.0 × EWMA 4)"
    assert counters(g.state) == (4.0, 4, 4, 1)


def test_a_lower_loss_is_never_a_spike():
    g = guard(factor=1.5, beta=0.9, warmup=1)
    feed(g, 10.0)
    for loss in (5.0, 1.0, 0.0, -1.0):
        assert feed(g, loss) is None
    assert g.state.skipped_steps == 0 and g.state.ewma_steps == 5


def test_guard_reads_the_trainer_section_of_the_run_config():
    g = LossGuard(TrainerConf(), TrainState())  # defaults: factor 4, beta 0.9, 20 warmup steps
    for _ in range(19):
        assert feed(g, 1.0) is None
    assert g.is_bad(1000.0) is None  # 19 good steps: still warming up
    assert feed(g, 1.0) is None
    assert g.is_bad(4.0) is None and g.is_bad(4.01) == "loss spike (4.01 > 4.0 × EWMA 1)"


def test_the_guard_works_on_the_runs_state_object():
    state = TrainState(loss_ewma=2.0, ewma_steps=50, skipped_steps=7)  # e.g. restored from a checkpoint
    g = LossGuard(TrainerConf(), state)
    assert g.is_bad(8.5) == "loss spike (8.5 > 4.0 × EWMA 2)"
    g.update(8.5, "loss spike")
    assert state.skipped_steps == 8 and state.consecutive_skips == 1 and state.loss_ewma == 2.0


# ----------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signals_set_the_flag(sig):
    saved = {s: signal.getsignal(s) for s in Preemption.SIGNALS}
    try:
        p = Preemption()
        assert p.requested is False
        os.kill(os.getpid(), sig)
        assert p.requested is True
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- drills
def test_drills_are_off_by_default():
    d = Drills.from_config([], {})
    assert (d.kill, d.pause_after_step, d.nan_at_steps, d.active) == (None, None, frozenset(), False)
    assert d.loss(1, 2.5) == 2.5
    d = Drills.from_config([], {KILL_ENV: "", PAUSE_ENV: ""})  # set but empty: off
    assert not d.active


def test_nan_at_listed_steps_only():
    d = Drills.from_config([3, 5], {})
    assert d.active and d.nan_at_steps == {3, 5}
    assert math.isnan(d.loss(3, 1.5)) and math.isnan(d.loss(5, 1.5)) and d.loss(4, 1.5) == 1.5


@pytest.mark.parametrize("env, kill, pause", [({KILL_ENV: "step:7"}, ("step", 7), None),
                                              ({KILL_ENV: "checkpoint:2"}, ("checkpoint", 2), None),
                                              ({PAUSE_ENV: "step:4"}, None, 4),
                                              ({PAUSE_ENV: "step:0"}, None, 0),
                                              ({KILL_ENV: "step:12", PAUSE_ENV: "step:3"}, ("step", 12), 3)])
def test_drills_parse_the_environment(env, kill, pause):
    d = Drills.from_config([], env)
    assert (d.kill, d.pause_after_step, d.active) == (kill, pause, True)


def test_drills_read_os_environ_by_default(monkeypatch):
    monkeypatch.setenv(KILL_ENV, "checkpoint:9")
    monkeypatch.delenv(PAUSE_ENV, raising=False)
    assert Drills.from_config([]).kill == ("checkpoint", 9)


@pytest.mark.parametrize("name, value, expected", [
    (KILL_ENV, "step", "step:N or checkpoint:N"), (KILL_ENV, "step:x", "step:N or checkpoint:N"),
    (KILL_ENV, "epoch:3", "step:N or checkpoint:N"), (KILL_ENV, "step:-1", "step:N or checkpoint:N"),
    (KILL_ENV, "checkpoint:", "step:N or checkpoint:N"), (KILL_ENV, "3", "step:N or checkpoint:N"),
    (PAUSE_ENV, "checkpoint:3", "step:N"), (PAUSE_ENV, "step: 3", "step:N"), (PAUSE_ENV, "4", "step:N")])
def test_bad_drill_values_name_the_variable(name, value, expected):
    with pytest.raises(ConfigError) as e:
        Drills.from_config([], {name: value})
    assert str(e.value) == f"{name}={value!r}: expected {expected}"


def test_pause_waits_for_the_signal():
    calls = []

    def signalled():
        calls.append(1)
        return len(calls) >= 3

    d = Drills(pause_after_step=4)
    d.after_step(3, signalled)
    assert calls == []  # another step: no wait
    d.after_step(4, signalled)
    assert len(calls) == 3


KILL_SCRIPT = """
import sys
from pretrain.trainer.faults import Drills
d = Drills(kill=(sys.argv[1], int(sys.argv[2])))
d.after_step(1, lambda: True)
d.before_commit(1)
print("alive after 1", flush=True)
d.after_step(2, lambda: True)
print("alive after step 2", flush=True)
d.before_commit(2)
print("alive after checkpoint 2", flush=True)
"""


@pytest.mark.parametrize("kind, survived", [("step", ["alive after 1"]),
                                            ("checkpoint", ["alive after 1", "alive after step 2"])])
def test_kill_drill_sigkills_at_its_point(kind, survived):
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, kind, "2"], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.splitlines() == survived
