"""Fixtures shared by the whole suite (the shared science corpus, the local Slurm cluster) and the marker
rules; the helpers themselves are plain functions in tests/helpers.py."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import helpers
from helpers import SHARED_CORPUS, SLURM_NODES, SLURM_SCRIPTS, SlurmCluster, slurm_cluster_answers, slurm_cluster_env


def pytest_addoption(parser):
    parser.addoption("--kill-drill", type=int, default=0, metavar="N",
                     help="run the random-kill drill (tests/faults/test_kill_drill.py) with N kills a layout")
    parser.addoption("--kill-drill-report", default=None, metavar="FILE", help="append the drill's kills to FILE")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """A test that uses the Slurm cluster is a `slurm` test, however it is marked."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slurm") is None:
            item.add_marker(pytest.mark.slurm)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up
def pytest_runtest_setup(item):
    """helpers.train() and helpers.torchrun() check the running test's marks (helpers.require_marks)."""
    helpers.current_marks = {m.name for m in item.iter_markers()}


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    """The real public science corpus in ../shared/corpus (CI always has it)."""
    if not (SHARED_CORPUS / "arxiv.jsonl").exists():
        pytest.skip(f"the shared science corpus is absent: {SHARED_CORPUS} (CI provides it)")
    return SHARED_CORPUS


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real local Slurm cluster (helpers.SlurmCluster): the one answering at $SLURM_CI_DIR (default
    /tmp/slurm-ci), left running; or one started here with tests/slurm/start-slurm.sh and stopped at the end."""
    d = Path(os.environ.get("SLURM_CI_DIR", "/tmp/slurm-ci"))
    env = slurm_cluster_env(d)
    if slurm_cluster_answers(env):
        yield SlurmCluster(d, env)
        return
    if os.geteuid() != 0:
        pytest.skip(f"no Slurm cluster answers at SLURM_CI_DIR={d}, and starting one (tests/slurm/start-slurm.sh) "
                    "needs root")
    if not (shutil.which("apt-get") or shutil.which("slurmctld")):
        pytest.skip(f"no Slurm cluster answers at SLURM_CI_DIR={d}, and tests/slurm/start-slurm.sh needs apt-get "
                    "(Debian's slurmctld, slurmd, slurm-client, munge packages)")
    proc = subprocess.run(["bash", str(SLURM_SCRIPTS / "start-slurm.sh")], capture_output=True, text=True,
                          timeout=600, env={**env, "SLURM_CI_DIR": str(d), "NODES": str(len(SLURM_NODES)), "CPUS": "2"})
    started = SlurmCluster(d, env, started_here=True)
    try:
        if proc.returncode != 0:
            if not shutil.which("slurmctld"):
                pytest.skip(f"could not install Slurm's Debian packages (slurmctld slurmd slurm-client munge):\n"
                            f"{proc.stderr[-2000:]}")
            pytest.fail(f"tests/slurm/start-slurm.sh failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                        f"{proc.stderr[-3000:]}")
        yield started
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop-slurm.sh")], env={**env, "SLURM_CI_DIR": str(d)}, timeout=60)
