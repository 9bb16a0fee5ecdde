"""slurm/examples/*.sh: each paper-size layout composes with Hydra, passes the trainer's own checks for its
world size, and fits in gal-plan's estimate, so a 128-node job does not die on a config key after queueing."""
import re
import shlex

import pytest
from hydra import compose, initialize_config_dir

from helpers import REPO
from launch import plan
from launch.env import check_topology
from pretrain.config import TrainConfig, model_config, register, typed, validate

GPUS_PER_NODE = 8  # the examples' --gpus-per-node (slurm/pretrain.sbatch's default)

EXAMPLES = sorted((REPO / "slurm" / "examples").glob("*.sh"))


def example_args(path):
    text = path.read_text()
    nodes = int(re.search(r"--nodes=(\d+)", text).group(1))
    line = text[text.index('pretrain.sbatch" \\') + len('pretrain.sbatch" \\'):]
    overrides = [o for o in shlex.split(line.replace('"$@"', "")) if "=" in o]
    return nodes, overrides


def test_there_is_an_example_per_paper_size():
    assert [p.stem for p in EXAMPLES] == sorted(["125m", "1.3b", "6.7b", "30b", "120b"])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_composes_validates_and_fits(path):
    nodes, overrides = example_args(path)
    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    train_cfg: TrainConfig = typed(cfg)
    model = model_config(train_cfg, {"vocab_size": 50000})
    world = nodes * GPUS_PER_NODE
    check_topology(world, train_cfg.trainer.tensor_parallel, GPUS_PER_NODE, gpus=True)  # TP divides, within a node
    validate(train_cfg, seq_len=2048, model_cfg=model, world_size=world)  # raises ConfigError naming the key
    zero = int(cfg.deepspeed.zero_stage)
    est = plan.plan(plan.Layout(model=train_cfg.model.size, nodes=nodes, gpus_per_node=GPUS_PER_NODE,
                                tp=train_cfg.trainer.tensor_parallel, zero=zero, micro_batch=train_cfg.trainer.micro_batch_size,
                                activation_checkpointing=train_cfg.model.activation_checkpointing,
                                global_batch_tokens=train_cfg.trainer.global_batch_tokens))
    assert est["fits"], f"{path.name}: gal-plan says this layout does not fit: {est['memory_per_gpu']}"
