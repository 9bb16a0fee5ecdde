"""How gal-train fails on a config it cannot run: one line on stderr naming the key, exit code 2, no
traceback (``--debug`` keeps it), and no empty run directory left behind; whether the config fails in
Hydra's composition, in the checks before the rendezvous, or after the run directory's lock was taken."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import synthetic_shards, train, train_cfg
from launch.env import DistEnv
from pretrain.config import ConfigError
from pretrain.trainer.setup import pick_device

CASES = {  # overrides → what the error line says
    "composition": (["trainer.max_tokens=abc"], "trainer.max_tokens=abc: Value 'abc' of type 'str' could not be "
                    "converted to Float"),
    "config group": (["model=nope"], "Could not find 'model/nope'; choose one of: 1.3b, 120b, 125m, 30b, 6.7b, tiny, tiny-2l"),
    "check": (["trainer.micro_batch_size=3"], "trainer.global_batch_tokens=128 gives 4 sequences of 32 tokens, not "
              "divisible by trainer.micro_batch_size=3"),
    "after the lock": (["resume=/nonexistent/checkpoints"], "resume=/nonexistent/checkpoints: no checkpoint there"),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("shards"), 32, 40, samples_per_shard=16)


@pytest.mark.trainer
@pytest.mark.parametrize("case", list(CASES))
def test_a_config_error_is_one_line_with_exit_2_and_leaves_no_run_directory(case, shards, tmp_path):
    overrides, message = CASES[case]
    run = tmp_path / "run"
    proc = train(1, run, shards, "trainer.max_tokens=256", "logger.wandb=false", *overrides, expect=2)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith(f"gal-train: error: {message}"), proc.stderr[-3000:]
    for noise in ("Traceback", "HYDRA_FULL_ERROR", "Error executing job", "ConfigError"):
        assert noise not in proc.stderr
    assert not run.exists()


@pytest.mark.trainer
def test_debug_keeps_the_traceback(shards, tmp_path):
    proc = train(1, tmp_path / "run", shards, "trainer.max_tokens=256", "trainer.micro_batch_size=3", "--debug",
                 expect=1)
    assert "Traceback" in proc.stderr and "pretrain.config.ConfigError: trainer.global_batch_tokens=128" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_names_the_key():
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1", master_port=0,
                  source="single")
    with pytest.raises(ConfigError, match=r"^trainer\.device=cuda, but this process sees no CUDA GPU"):
        pick_device(train_cfg("trainer.device=cuda"), env)
