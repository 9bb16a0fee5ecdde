"""gal-plan: model-state memory against DeepSpeed's own estimators, fit verdicts, --suggest, the CLI."""
from __future__ import annotations

import json
import subprocess

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from helpers import BIN, REPO
from launch import plan as gp
from pretrain.config import CONF_DIR, ConfigError, global_batch_samples, model_preset

GAL_PLAN = BIN / "gal-plan"
PAPER = ["125m", "1.3b", "6.7b", "30b", "120b"]
# (nodes, TP): DeepSpeed's estimators know no TP; with TP they are given one TP shard and DP = GPUs / TP.
LAYOUTS = [(1, 1), (16, 1), (128, 8)]


def deepspeed_gpu_bytes(lay: gp.Layout) -> int:
    pc = gp.param_counts(lay.config(), lay.tp)
    if lay.zero == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(
            total_params=pc["per_tp_shard"], num_gpus_per_node=lay.gpus_per_node // lay.tp, num_nodes=lay.nodes,
            cpu_offload=lay.offload == "optimizer")
    else:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=pc["per_tp_shard"], largest_layer_params=pc["largest_layer"],
            num_gpus_per_node=lay.gpus_per_node // lay.tp, num_nodes=lay.nodes,
            cpu_offload=lay.offload != "none", cpu_offload_params=lay.offload == "param")
    return gpu


@pytest.mark.parametrize("size", PAPER)
@pytest.mark.parametrize("zero,offload", [(2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "param")])
def test_model_states_match_deepspeed_estimators(size, zero, offload):
    for nodes, tp in LAYOUTS:
        lay = gp.Layout(model=size, nodes=nodes, gpus_per_node=8, tp=tp, zero=zero, offload=offload)
        ours = gp.model_states(lay)["gpu_total"]
        theirs = deepspeed_gpu_bytes(lay)
        assert abs(ours / theirs - 1) < 0.10, (size, nodes, tp, zero, offload, ours, theirs)


def test_param_counts_agree_with_the_model():
    """The analytic count is GalacticaLM.num_parameters (built on the meta device) and its FLOPs."""
    import torch

    from model.transformer import GalacticaLM
    for size in ("tiny", "125m", "1.3b"):
        cfg = model_preset(size)
        with torch.device("meta"):
            model = GalacticaLM(cfg)
        assert gp.param_counts(cfg)["total"] == model.num_parameters()
        assert gp.flops_per_token(cfg, 2048) == model.flops_per_token(2048)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        assert gp.param_counts(cfg)["largest_layer"] == largest  # DeepSpeed's model_to_params


def test_tp_splits_params_and_activations():
    one = gp.plan(gp.Layout(model="30b", nodes=4, tp=1, zero=3))
    eight = gp.plan(gp.Layout(model="30b", nodes=4, tp=8, zero=3))
    p1, p8 = one["params"]["per_tp_shard"], eight["params"]["per_tp_shard"]
    assert 7.9 < p1 / p8 < 8.0  # everything but LayerNorms and positions is split
    layers1, layers8 = one["memory_per_gpu"]["activations"]["layers"], eight["memory_per_gpu"]["activations"]["layers"]
    assert layers1 / layers8 == pytest.approx(34 / (10 + 24 / 8))  # Korthikanti et al. eq. 2


def test_activation_formula_and_recompute():
    lay = gp.Layout(model="1.3b", micro_batch=2, seq_len=2048, attention="math")
    cfg = lay.config()
    sbh = 2048 * 2 * cfg.d_model
    per_layer = sbh * (34 + 5 * cfg.n_heads * 2048 / cfg.d_model)
    assert gp.activations(lay)["layers"] == pytest.approx(cfg.n_layers * per_layer)
    flash = gp.activations(gp.Layout(model="1.3b", micro_batch=2))["layers"]
    assert flash == pytest.approx(cfg.n_layers * sbh * 34)
    ac = gp.activations(gp.Layout(model="1.3b", micro_batch=2, activation_checkpointing=True))["layers"]
    assert ac == pytest.approx(cfg.n_layers * 2 * sbh + 34 * sbh)
    logits = gp.activations(gp.Layout(model="1.3b", micro_batch=2))["logits"]
    assert logits == 2048 * 2 * 50000 * (2 + 4 + 4)


def test_known_fits():
    assert not gp.plan(gp.Layout(model="120b", nodes=1, gpus_per_node=8, zero=2))["fits"]
    assert gp.plan(gp.Layout(model="125m", nodes=1, gpus_per_node=1, zero=2))["fits"]
    # 6.7B on one 80 GiB GPU: 16 bytes of model states per parameter alone are ~100 GiB
    assert not gp.plan(gp.Layout(model="6.7b", nodes=1, gpus_per_node=1, zero=0))["fits"]


def test_global_batch_is_rounded_as_the_trainer_rounds_it():
    assert gp.CONF_MODEL == CONF_DIR / "model"
    for tokens in (1000, 2047, 3100, 2_000_000, 4_000_001):  # not all whole sequences
        lay = gp.Layout(model="125m", seq_len=2048, global_batch_tokens=tokens)
        assert gp.global_batch(lay)["samples"] == global_batch_samples(tokens, 2048)
    assert gp.global_batch(gp.Layout(model="30b"))["tokens"] == 2_000_000  # conf/model/30b.yaml


def test_tp_is_checked_by_the_trainers_own_rules():
    """check_topology (launch/env.py) and GalacticaConfig.validate_tensor_parallel, as ConfigError naming --tp;
    --suggest only tries what validate accepts."""
    for lay, msg in [(gp.Layout(model="120b", nodes=2, tp=16), "--tp 16: .*larger than the 8 GPUs per node"),
                     (gp.Layout(model="120b", nodes=1, tp=3), "--tp 3: world size 8 is not divisible"),
                     (gp.Layout(model="1.3b", gpus_per_node=3, tp=3), "--tp 3: GalacticaConfig.n_heads=32")]:
        with pytest.raises(ConfigError, match=msg):
            gp.validate(lay)
    base = gp.Layout(model="1.3b", nodes=1, gpus_per_node=4)
    assert [t for t in gp.SUGGEST_TP if gp._tp_fits(base, t)] == [1, 2, 4]


def test_suggest_120b_on_128_nodes():
    found = gp.suggest(gp.Layout(model="120b", nodes=128, gpus_per_node=8, gpu_memory_gib=80))
    cost, best, p = found[0]
    assert p["fits"] and p["memory_per_gpu"]["total"] <= 80 * gp.GIB * 0.9
    assert best.tp * best.dp == 1024 and p["batch"]["divisible"]
    assert f"trainer.tensor_parallel={best.tp}" in p["overrides"]
    # ZeRO-2 at TP=1 keeps all 121B bf16 weights on every GPU: never a candidate
    assert not any(lay.tp == 1 and lay.zero in (1, 2) for _, lay, _ in found)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(GAL_PLAN), *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_cli_help_lists_the_options():
    proc = run("--help")
    assert proc.returncode == 0
    for flag in ("--model", "--nodes", "--gpus-per-node", "--gpu-memory-gib", "--tp", "--zero", "--offload",
                 "--micro-batch", "--seq-len", "--activation-checkpointing", "--global-batch-tokens", "--tokens",
                 "--mfu", "--peak-tflops", "--dtype", "--suggest", "--json"):
        assert flag in proc.stdout, flag


def test_cli_json_and_text():
    proc = run("--model", "1.3b", "--nodes", "2", "--zero", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)
    assert p["layout"]["dp"] == 16 and p["fits"] is True
    assert p["params"]["total"] == gp.param_counts(gp.Layout(model="1.3b").config())["total"]
    text = run("--model", "120b", "--nodes", "1", "--zero", "2")
    assert text.returncode == 0 and "DOES NOT FIT" in text.stdout


@pytest.mark.parametrize("args,flag", [
    (["--model", "7b"], "argument --model"),  # argparse's own choices check
    (["--zero", "4"], "argument --zero"),
    (["--zero", "2", "--offload", "param"], "--offload param"),
    (["--model", "120b", "--tp", "3"], "--tp 3"),
    (["--model", "120b", "--nodes", "2", "--tp", "16"], "--tp 16"),
    (["--micro-batch", "0"], "--micro-batch"),
    (["--mfu", "1.5"], "--mfu"),
    (["--seq-len", "4096"], "--seq-len"),
])
def test_cli_bad_input_names_the_flag(args, flag):
    proc = run(*args)
    assert proc.returncode == 2
    assert f"gal-plan: error: {flag}" in proc.stderr, proc.stderr


def test_suggest_reports_when_nothing_fits():
    proc = run("--model", "120b", "--nodes", "1", "--gpus-per-node", "1", "--cpu-memory-gib", "1000", "--suggest")
    assert proc.returncode == 2 and "--suggest: no layout" in proc.stderr
