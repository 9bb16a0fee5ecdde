"""A non-editable install carries its Hydra configuration: the commands compose from any directory."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install .`` (no dependencies: those are the test environment's) into a fresh directory."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def run_installed(installed, cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(installed)}  # before the editable checkout on sys.path
    return subprocess.run([sys.executable, str(installed / "bin" / args[0]), *args[1:]], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


def test_installed_gal_train_composes_its_config_from_another_directory(installed, tmp_path):
    proc = run_installed(installed, tmp_path, "gal-train", "--cfg", "job", "model=125m", "validation=science")
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = proc.stdout
    for line in ("n_layers: 12", "d_model: 768", "n_heads: 12", "ffn_mult: 4", "max_positions: 2048",
                 "dropout: 0.1", "global_batch_tokens: 500000", "lr_max: 0.0006", "probes: true"):
        assert line in job
    probe = subprocess.run([sys.executable, "-c", "import pretrain.config as c; print(c.CONF_DIR)"],
                           capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)})
    assert probe.stdout.strip() == str(installed / "conf")  # the installed copy, not the checkout's


def test_installed_gal_prepare_composes_its_config(installed, tmp_path):
    proc = run_installed(installed, tmp_path, "gal-prepare", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seq_len:" in proc.stdout and "corpus:" in proc.stdout


def test_probes_follow_the_validation_group_not_the_model_size(installed, tmp_path):
    proc = run_installed(installed, tmp_path, "gal-train", "--cfg", "job", "model=30b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "probes: false" in proc.stdout and "n_layers: 48" in proc.stdout


def test_installed_copy_carries_the_sweep_launchers(installed, tmp_path):
    """conf/hydra/launcher/{local,slurm}.yaml name launchers that Hydra loads only from the hydra_plugins package."""
    probe = ("from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher; "
             "import hydra_plugins.galactica_launchers as m; print(m.__file__); "
             "print(*sorted(c.__module__ + '.' + c.__name__ for c in Plugins.instance().discover(Launcher)))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(installed)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, launchers = proc.stdout.splitlines()[-2:]
    assert where.startswith(str(installed))
    assert {"hydra_plugins.galactica_launchers.LocalLauncher",
            "hydra_plugins.galactica_launchers.SlurmLauncher"} <= set(launchers.split())
