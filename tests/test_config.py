"""pretrain/config.py: config_hash (what a resume compares), validate (errors naming the keys, with a
suggestion that works), the batch arithmetic, model_config / model_preset / model_shape; and
pretrain.data.shards.data_identity (what the data is, not where it lies)."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest

from helpers import REPO, synthetic_shards, train_cfg
from model.config import GalacticaConfig
from pretrain.config import (HASHED_KEYS, ConfigError, TrainConfig, config_hash,
                             divisible_global_batch_samples, global_batch_samples, model_config, model_preset,
                             model_shape, model_sizes, validate)
from pretrain.data.shards import data_identity, read_manifest

IDENTITY = "0123456789abcdef"


def changed(cfg: TrainConfig, key: str, value) -> TrainConfig:
    out = copy.deepcopy(cfg)
    *path, last = key.split(".")
    node = out
    for part in path:
        node = getattr(node, part)
    assert hasattr(node, last), key
    setattr(node, last, value)
    return out


# ----------------------------------------------------------------------------- config_hash
def test_hashed_keys():
    assert HASHED_KEYS == ("model.dropout", "model.attention_dropout", "optim", "data.seed", "data.mixture",
                           "data.repeat", "seed")


def test_config_hash_is_a_digest_of_the_hashed_keys_and_the_data_identity():
    cfg = train_cfg()
    h = config_hash(cfg, IDENTITY)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    keep = {"data_identity": IDENTITY, "model.dropout": 0.1, "model.attention_dropout": 0.1,
            "optim": {"lr_max": 2e-3, "lr_final_ratio": 0.1, "warmup_tokens": 200000, "beta1": 0.9, "beta2": 0.95,
                      "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0},
            "data.seed": 1234, "data.mixture": {}, "data.repeat": {"source": None, "samples": 0, "fraction": 0.0},
            "seed": 1234}
    assert h == hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(copy.deepcopy(cfg), IDENTITY) == h



def test_token_counts_take_float_forms_and_must_be_whole():
    cfg = train_cfg("trainer.max_tokens=450e9", "optim.warmup_tokens=3.75e8", "trainer.global_batch_tokens=384")
    check(cfg)
    assert cfg.trainer.max_tokens == 450_000_000_000 and type(cfg.trainer.max_tokens) is int
    assert cfg.optim.warmup_tokens == 375_000_000 and type(cfg.optim.warmup_tokens) is int
    with pytest.raises(ConfigError, match=r"^trainer\.max_tokens=1000\.5 must be a whole number of tokens$"):
        check(train_cfg("trainer.max_tokens=1000.5", "trainer.global_batch_tokens=384"))


HASHED_CHANGES = [("model.dropout", 0.0), ("model.attention_dropout", 0.2), ("optim.lr_max", 1e-3),
                  ("optim.lr_final_ratio", 0.2), ("optim.warmup_tokens", 1), ("optim.beta1", 0.8),
                  ("optim.beta2", 0.99), ("optim.eps", 1e-6), ("optim.weight_decay", 0.0), ("optim.grad_clip", 0.5),
                  ("data.seed", 1), ("seed", 1)]


def test_config_hash_changes_with_every_hashed_key_and_the_data():
    cfg = train_cfg()
    base = config_hash(cfg, IDENTITY)
    hashes = {key: config_hash(changed(cfg, key, value), IDENTITY) for key, value in HASHED_CHANGES}
    hashes["data identity"] = config_hash(cfg, IDENTITY[::-1])
    assert base not in hashes.values(), {k: v for k, v in hashes.items() if v == base}
    assert len(set(hashes.values())) == len(hashes)


RUNTIME_CHANGES = [("data.path", "/elsewhere/shards"), ("data.prefetch", 0), ("data.record_sample_ids", True),
                   ("logger.wandb", False), ("logger.mode", "offline"), ("logger.init_timeout_s", 5.0),
                   ("logger.project", "p"), ("logger.group", "g"), ("logger.name", "n"),
                   ("logger.console", False), ("validation.enabled", False), ("validation.interval_tokens", 1000),
                   ("validation.after_boundary_points", 5), ("validation.seen_samples", 3),
                   ("validation.probes", True), ("validation.micro_batch_size", 1),
                   ("checkpoint.interval_tokens", 4096), ("checkpoint.keep_last", 1),
                   ("trainer.log_interval_steps", 10), ("trainer.max_tokens", 10**9), ("trainer.max_epochs", 7.0),
                   ("trainer.device", "cpu"), ("run_dir", "/other/run"), ("resume", "none"),
                   ("deepspeed.zero_stage", 3)]


@pytest.mark.parametrize("key, value", RUNTIME_CHANGES, ids=[k for k, _ in RUNTIME_CHANGES])
def test_config_hash_ignores_runtime_knobs(key, value):
    cfg = train_cfg()
    assert config_hash(changed(cfg, key, value), IDENTITY) == config_hash(cfg, IDENTITY)


# ----------------------------------------------------------------------------- data identity
def test_data_identity_follows_content_not_path(tmp_path):
    a = synthetic_shards(tmp_path / "a", seq_len=8, n_samples=20, samples_per_shard=8)
    ident = data_identity(a, read_manifest(a))
    assert re.fullmatch(r"[0-9a-f]{16}", ident)
    b = tmp_path / "moved" / "b"
    shutil.copytree(a, b)
    assert data_identity(b, read_manifest(b)) == ident
    # the same samples written again: the same shard bytes, the same identity
    again = synthetic_shards(tmp_path / "again", seq_len=8, n_samples=20, samples_per_shard=8)
    assert data_identity(again, read_manifest(again)) == ident
    # other tokens in the last shard: another identity
    other = synthetic_shards(tmp_path / "other", seq_len=8, n_samples=20, samples_per_shard=8, pad_last=3)
    shas = [[s["sha256"] for s in json.loads((d / "train" / "syn" / "index.json").read_text())["shards"]] for d in (a, other)]
    assert shas[0][:2] == shas[1][:2] and shas[0][2] != shas[1][2]
    assert data_identity(other, read_manifest(other)) != ident
    # the vocabulary, the pad id and the tokenizer are part of it
    manifest = read_manifest(a)
    variants = [{**manifest, "vocab_size": 300}, {**manifest, "pad_id": 0}, {**manifest, "tokenizer": {"sha256": "x"}}]
    idents = {data_identity(a, m) for m in variants}
    assert ident not in idents and len(idents) == 3
    # another split of the same samples into shards is another identity (the shards' hashes differ)
    resplit = synthetic_shards(tmp_path / "resplit", seq_len=8, n_samples=20, samples_per_shard=10)
    assert data_identity(resplit, read_manifest(resplit)) != ident


# ----------------------------------------------------------------------------- batch arithmetic
@pytest.mark.parametrize("tokens, seq, expected", [(128, 32, 4), (100, 32, 3), (112, 32, 4), (10, 32, 1),
                                                   (16384, 2048, 8), (500_000, 2048, 244)])
def test_global_batch_samples(tokens, seq, expected):
    assert global_batch_samples(tokens, seq) == expected


@pytest.mark.parametrize("samples, per_step, expected", [(4, 6, 6), (4, 2, 4), (10, 4, 8), (14, 4, 16), (1, 8, 8),
                                                         (244, 16, 240), (250, 16, 256)])
def test_divisible_global_batch_samples(samples, per_step, expected):
    got = divisible_global_batch_samples(samples, per_step)
    assert got == expected and got % per_step == 0


# ----------------------------------------------------------------------------- validate
def tiny(**overrides) -> GalacticaConfig:
    return model_preset("tiny-2l", **{"vocab_size": 256, **overrides})


def check(cfg: TrainConfig, seq_len: int = 32, world_size: int = 1, model_cfg: GalacticaConfig | None = None):
    validate(cfg, seq_len=seq_len, model_cfg=model_cfg or tiny(), world_size=world_size)


def test_a_good_config_passes():
    check(train_cfg("trainer.global_batch_tokens=128", "trainer.max_tokens=256"), world_size=2)
    check(train_cfg("trainer.global_batch_tokens=128", "trainer.tensor_parallel=2"), world_size=4)


def test_batch_not_divisible_names_the_keys_and_a_value_that_works():
    cfg = train_cfg("trainer.global_batch_tokens=128", "trainer.micro_batch_size=3")
    with pytest.raises(ConfigError) as e:
        check(cfg, world_size=2)
    assert str(e.value) == ("trainer.global_batch_tokens=128 gives 4 sequences of 32 tokens, not divisible by "
                            "trainer.micro_batch_size=3 × 2 data-parallel ranks; e.g. trainer.global_batch_tokens=192")


@pytest.mark.parametrize("tokens, seq, mb, world, tp", [
    (128, 32, 3, 2, 1), (128, 32, 1, 3, 1), (100, 32, 2, 1, 1), (16384, 2048, 3, 1, 1), (500_000, 2048, 1, 16, 1),
    (500_000, 2048, 4, 64, 2), (4096, 512, 1, 6, 2), (64, 64, 1, 8, 4), (3000, 100, 7, 4, 1)])
def test_the_suggested_batch_passes(tokens, seq, mb, world, tp):
    cfg = train_cfg(f"trainer.global_batch_tokens={tokens}", f"trainer.micro_batch_size={mb}",
                    f"trainer.tensor_parallel={tp}")
    with pytest.raises(ConfigError) as e:
        check(cfg, seq_len=seq, world_size=world)
    msg = str(e.value)
    assert msg.startswith(f"trainer.global_batch_tokens={tokens} gives ") and f"trainer.micro_batch_size={mb} × " \
        f"{world // tp} data-parallel ranks" in msg and "\n" not in msg
    suggestion = int(re.search(r"e\.g\. trainer\.global_batch_tokens=(\d+)$", msg).group(1))
    assert suggestion % seq == 0
    check(changed(cfg, "trainer.global_batch_tokens", suggestion), seq_len=seq, world_size=world)


@pytest.mark.parametrize("overrides, world, model_kw, message", [
    (["trainer.tensor_parallel=3"], 3, {}, r"^trainer\.tensor_parallel=3: GalacticaConfig\.n_heads=4 is not divisible"),
    (["trainer.tensor_parallel=2"], 2, {"vocab_size": 255}, r"^trainer\.tensor_parallel=2: GalacticaConfig\.vocab_size=255"),
    (["deepspeed.zero_stage=4"], 1, {}, r"^deepspeed\.zero_stage=4 must be 0, 1, 2 or 3$"),
    (["deepspeed.offload_param=true"], 1, {}, r"^deepspeed\.offload_param=true needs deepspeed\.zero_stage=3$"),
    (["deepspeed.precision=fp16"], 1, {}, r"^deepspeed\.precision='fp16' must be auto, bf16 or fp32$"),
    (["trainer.max_epochs=null"], 1, {}, r"^set trainer\.max_tokens or trainer\.max_epochs"),
    (["optim.lr_final_ratio=0"], 1, {}, r"^optim\.lr_final_ratio=0\.0 must be in \(0, 1\]$"),
    (["optim.lr_final_ratio=1.5"], 1, {}, r"^optim\.lr_final_ratio=1\.5 must be in \(0, 1\]$"),
    (["validation.probes=true", "validation.probe_batch_size=0"], 1, {}, r"^validation\.probe_batch_size=0 must be >= 1$"),
    (["validation.probes=true", "validation.probe_smiles_max_new_tokens=2048"], 1, {},
     r"^validation\.probe_max_new_tokens / probe_smiles_max_new_tokens must be below the model's 2048 positions$"),
    (["resume="], 1, {}, r"^resume must be auto, none or a checkpoint directory$"),
    # values that cannot be meant: 0 or negative where the key counts or scales something
    (["optim.lr_max=0"], 1, {}, r"^optim\.lr_max=0\.0 must be > 0$"),
    (["optim.lr_max=-1e-3"], 1, {}, r"^optim\.lr_max=-0\.001 must be > 0$"),
    (["trainer.max_tokens=0"], 1, {}, r"^trainer\.max_tokens=0 must be > 0$"),
    (["trainer.max_tokens=-5"], 1, {}, r"^trainer\.max_tokens=-5 must be > 0$"),
    (["trainer.max_epochs=0"], 1, {}, r"^trainer\.max_epochs=0\.0 must be > 0$"),
    (["checkpoint.interval_tokens=0"], 1, {}, r"^checkpoint\.interval_tokens=0 must be > 0$"),
    (["trainer.micro_batch_size=0"], 1, {}, r"^trainer\.micro_batch_size=0 must be > 0$"),
    (["trainer.log_interval_steps=0"], 1, {}, r"^trainer\.log_interval_steps=0 must be > 0$"),
    (["validation.micro_batch_size=0"], 1, {}, r"^validation\.micro_batch_size=0 must be > 0$"),
    (["validation.max_cost=0"], 1, {}, r"^validation\.max_cost=0\.0 must be > 0$"),
    (["optim.warmup_tokens=-1"], 1, {}, r"^optim\.warmup_tokens=-1 must be >= 0$"),
])
def test_validate_names_the_key(overrides, world, model_kw, message):
    cfg = train_cfg("trainer.global_batch_tokens=384", *overrides)  # 12 sequences: divisible by 1, 2, 3 ranks
    with pytest.raises(ConfigError, match=message):
        check(cfg, world_size=world, model_cfg=tiny(**model_kw))


def test_validate_accepts_the_edges_of_those_rules():
    check(train_cfg("optim.lr_final_ratio=1.0"))
    check(train_cfg("deepspeed=zero3_offload"))
    check(train_cfg("validation.probe_batch_size=0"))  # probes off: their settings are not read
    check(train_cfg("trainer.max_epochs=null", "trainer.max_tokens=1"))


def test_sequences_longer_than_the_positions():
    cfg = train_cfg("model.max_positions=64")
    with pytest.raises(ConfigError, match=r"^data\.path: the shards hold 128-token sequences, above the model's 64 "
                                          r"positions \(model\.size=tiny-2l\)$"):
        check(cfg, seq_len=128, model_cfg=tiny(max_positions=64))
    check(cfg, seq_len=64, model_cfg=tiny(max_positions=64))


# ----------------------------------------------------------------------------- model configs
def test_model_config_takes_the_vocabulary_from_the_manifest_unless_set():
    cfg = train_cfg()
    m = model_config(cfg, {"vocab_size": 256})
    assert (m.n_layers, m.d_model, m.n_heads, m.vocab_size, m.max_positions) == (2, 64, 4, 256, 2048)
    assert (m.dropout, m.attention_dropout) == (0.1, 0.1)
    assert model_config(train_cfg("model.vocab_size=512", "model.dropout=0.0"), {"vocab_size": 256}).vocab_size == 512
    with pytest.raises(ConfigError, match=r"^model \(model\.size=tiny-2l\): GalacticaConfig\.d_model=64 must be "
                                          r"divisible by GalacticaConfig\.n_heads=5$"):
        model_config(train_cfg("model.n_heads=5"), {"vocab_size": 256})


def test_model_preset_and_shape():
    paper = {"bias": False, "layer_norm_affine": True, "layer_norm_bias": False, "activation": "gelu"}  # §2.1
    assert model_shape(tiny()) == {"n_layers": 2, "d_model": 64, "n_heads": 4, "ffn_mult": 4, "max_positions": 2048,
                                   "vocab_size": 256, **paper}
    assert model_preset("tiny-2l").vocab_size == 50000
    assert model_shape(model_preset("125m")) == {"n_layers": 12, "d_model": 768, "n_heads": 12, "ffn_mult": 4,
                                                 "max_positions": 2048, "vocab_size": 50000, **paper}
    assert model_preset("tiny-2l", dropout=0.0).dropout == 0.0
    assert {"tiny-2l", "125m", "120b"} <= set(model_sizes())
    with pytest.raises(ConfigError, match=r"^model size 'nope' is unknown; choose one of \["):
        model_preset("nope")
    # the preset and a composed run config agree
    assert asdict(model_config(train_cfg(), {"vocab_size": 256})) == asdict(tiny())


# ----------------------------------------------------------------------------- --help
@pytest.mark.parametrize("prog, module, own, foreign", [
    ("gal-train", "pretrain.train", ["model", "deepspeed", "data", "optim", "trainer", "logger", "checkpoint", "validation",
                        "experiment", "hydra/launcher"], ["corpus"]),
    ("gal-prepare", "pretrain.prepare", ["corpus"], ["model", "deepspeed", "optim"]),
])
def test_help_lists_the_commands_own_groups_and_imports_no_torch(prog, module, own, foreign):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "deepspeed", "megatron", "transformers"}  # the help answers at once
    assert proc.stdout.startswith(f"{prog}: ") and "powered by Hydra" not in proc.stdout
    groups = dict(line.split(": ", 1) for line in proc.stdout.split("== Config groups (group=option) ==")[1]
                  .split("==")[0].strip().splitlines())
    assert list(groups) == own and not set(groups) & set(foreign)
    for group, options in groups.items():  # the help's lists are conf/'s
        assert sorted(options.split(", ")) == sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")), group
