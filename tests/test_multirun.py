"""Hydra multiruns through the project's submitit launchers (conf/hydra/launcher/, launch/sweep.py): a console
line per finished point, wandb names from the swept values, no empty `.submitit/%j` folder.

The sweep here runs a stand-in task (a few lines of Hydra app, no trainer) with the project's own launcher
config, so that it takes seconds; tests/slurm/test_sweep.py runs gal-train itself through the same launchers."""
from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

from hydra.types import RunMode

from helpers import REPO, train_env
from launch.sweep import name_point, point_label, swept_keys

# A sweep point as gal-train would leave it: names as the trainer sets them, a metrics.jsonl, and the trainer's
# one-line error and exit code 2 for a point it refuses.
APP = '''
import sys
from pathlib import Path
from types import SimpleNamespace

import hydra
from hydra.core.hydra_config import HydraConfig

from launch.sweep import name_point


@hydra.main(config_path=None, config_name=None, version_base="1.3")
def main(cfg):
    logger = SimpleNamespace(group=None, name=None)
    name_point(logger, HydraConfig.get())
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "names.txt").write_text(f"{logger.group}|{logger.name}")
    (out / "metrics.jsonl").write_text('{"step": 3, "tokens_seen": 384, "loss": %s}\\n' % (cfg.lr + 0.5))
    if cfg.lr > 1:
        print("gal-train: error: lr=2 is too high", file=sys.stderr)
        sys.exit(2)


main()
'''


def test_swept_keys_and_a_points_label():
    command_line = ["optim.lr_max=1e-3,2e-3", "+data.mixture={arxiv:0.8,proteins:0.2}",
                    "data.repeat.samples=range(1,4)", "data.path=/shards", "seed=choice(1,2)"]
    swept = swept_keys(command_line)
    assert swept == {"optim.lr_max", "data.repeat.samples", "seed"}
    point = ["optim.lr_max=0.001", "+data.mixture={arxiv:0.8,proteins:0.2}", "data.repeat.samples=2",
             "data.path=/shards", "seed=1"]
    assert point_label(point, swept) == "optim.lr_max=0.001,data.repeat.samples=2,seed=1"


def test_a_single_run_and_set_names_are_left_alone(tmp_path):
    logger = SimpleNamespace(group=None, name=None)
    name_point(logger, SimpleNamespace(mode=RunMode.RUN))
    assert (logger.group, logger.name) == (None, None)
    logger = SimpleNamespace(group="mine", name="also mine")
    name_point(logger, SimpleNamespace(mode=RunMode.MULTIRUN, sweep=SimpleNamespace(dir=str(tmp_path)),
                                       overrides=SimpleNamespace(task=["seed=1"])))
    assert (logger.group, logger.name) == ("mine", "also mine")


def test_local_launcher_reports_each_point_names_it_and_leaves_no_empty_folder(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(APP)
    sweep = tmp_path / "lr_sweep"
    proc = subprocess.run([sys.executable, str(app), "-m", f"hydra.searchpath=[file://{REPO / 'conf'}]",
                           "hydra/launcher=local", f"hydra.sweep.dir={sweep}", "+lr=1,2", "+data.path=/shards"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=train_env())
    assert proc.returncode != 0  # a failed point fails the multirun, as before
    lines = [line.split("] ", 1)[-1] for line in proc.stdout.splitlines() if "] sweep " in line]
    assert len(lines) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    done, failed = sorted(lines, key=lambda x: " failed: " in x)  # in the order they finished: either
    assert re.fullmatch(rf"sweep [12]/2 done: lr=1 → loss 1\.5 after 3 steps, {re.escape(str(sweep / '0'))}", done)
    assert re.fullmatch(r"sweep [12]/2 failed: lr=2 → gal-train: error: lr=2 is too high "
                        r"\(loss 2\.5 after 3 steps\); "
                        rf"log {re.escape(str(sweep))}/\.submitit/\d+/\d+_0_log\.err", failed), lines
    assert {done[6], failed[6]} == {"1", "2"}
    assert [(sweep / n / "names.txt").read_text() for n in ("0", "1")] == ["lr_sweep|lr=1", "lr_sweep|lr=2"]
    assert [p.name for p in (sweep / ".submitit").iterdir() if not p.name.isdigit()] == []
