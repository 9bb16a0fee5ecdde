"""gal-prepare executor=slurm on the real local Slurm cluster (two nodes): a job array per stage, each
depending on the one before; the shard set is the local executor's, byte for byte."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from helpers import REPO, SCALE_ARGS, make_cfg, scale_inputs, shard_set_digest

from pretrain.data.pipeline import prepare

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_two_node_slurm_run_gives_the_local_shard_set(slurm_cluster, shared_corpus, tmp_path):
    inputs = scale_inputs(tmp_path, shared_corpus)
    common = [f"input=[{','.join(inputs)}]", *SCALE_ARGS]
    prepare(make_cfg(*common, f"output={tmp_path}/local", "tasks=2"), progress=False)
    # two tasks a stage of two CPUs each: one task per node, so every stage of two units or more runs on both
    command = [sys.executable, "-m", "pretrain.prepare", *common, f"output={tmp_path}/slurm", "executor=slurm",
               "slurm.partition=debug", "slurm.cpus_per_task=2", "slurm.mem_per_cpu=100M", "slurm.time=20",
               "slurm.poll_s=0.5", "tasks=2"]
    submit = subprocess.run([*command, "slurm.wait=false"], cwd=REPO, env=slurm_cluster.env, capture_output=True,
                            text=True, timeout=300)
    assert submit.returncode == 0 and "submitted Slurm jobs" in submit.stdout, submit.stderr[-5000:]
    assert not (tmp_path / "slurm").exists()
    # the same command while those jobs run: it waits for them and submits nothing
    proc = subprocess.run(command, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "still queued or running" in proc.stderr and "Slurm jobs (" not in proc.stderr
    assert shard_set_digest(tmp_path / "slurm") == shard_set_digest(tmp_path / "local")
    jobs = re.search(r"submitted (\d+) Slurm jobs \(([\d, ]+)\)", submit.stderr)
    assert jobs and int(jobs.group(1)) == 11  # read ... pack, finish: one job array a stage
    nodes = set()
    for job in jobs.group(2).split(", "):
        out = slurm_cluster.run("scontrol", "show", "job", "-o", job, check=False).stdout
        nodes |= set(re.findall(r"\bNodeList=(node\d)", out))
        assert "JobState=COMPLETED" in out and "JobState=FAILED" not in out, out
    assert nodes == {"node1", "node2"}
    # the work directory keeps the Slurm logs (the jobs' output) next to the output
    assert list((tmp_path / ".slurm.work" / "logs").glob("read-*/slurm_logs/*.out"))
