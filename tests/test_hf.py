"""Export to / import from Hugging Face OPTForCausalLM: our own exports, and every architecture variant
of the released OPT / Galactica checkpoints (helpers.OPT_VARIANTS), at TP=1 and TP=2."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import OPTForCausalLM

from model import GalacticaConfig, GalacticaLM
from model.hf import POSITION_OFFSET, export_hf, import_hf, merge_tp_state_dicts, shard_state_dict
from helpers import OPT_VARIANTS, REPO, tiny_opt, torchrun

SMALL = dict(n_layers=2, d_model=64, n_heads=4, vocab_size=500, max_positions=64)


def own_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = GalacticaLM(GalacticaConfig(**SMALL)).eval()
    out = export_hf(model, tmp_path_factory.mktemp("hf") / "tiny")
    return model, out


def test_export_writes_an_opt_folder(exported):
    model, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["OPTForCausalLM"] and config["model_type"] == "opt"
    assert config["enable_bias"] is False and config["activation_function"] == "gelu"
    assert config["do_layer_norm_before"] is True and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["pad_token_id"], config["eos_token_id"]) == (0, 1, 2)
    assert config["max_position_embeddings"] == 64 and config["word_embed_proj_dim"] == 64
    weights = load_file(str(out / "model.safetensors"))
    pos = weights["model.decoder.embed_positions.weight"]
    assert pos.shape == (64 + POSITION_OFFSET, 64)
    assert torch.equal(pos[POSITION_OFFSET:], model.wpe.weight.detach())  # row i + 2 is position i
    assert not any(k.endswith(("q_proj.bias", "fc1.bias")) for k in weights)
    assert not weights["model.decoder.layers.0.final_layer_norm.bias"].any()  # HF LayerNorm bias: zeros


def test_transformers_gives_the_same_logits(exported):
    model, out = exported
    hf = OPTForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (3, 40, SMALL["vocab_size"])
    assert (ours - theirs).abs().max() < 1e-4


def test_import_round_trips_exactly(exported):
    model, out = exported
    imported = import_hf(out)
    assert imported.config.bias is False and imported.config.n_layers == SMALL["n_layers"]
    a, b = own_state(model), own_state(imported)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict:
    """Each variant as a transformers-made folder, with transformers' logits on the same ids."""
    root = tmp_path_factory.mktemp("variants")
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    out = {"ids": ids}
    for name in OPT_VARIANTS:
        with torch.no_grad():
            out[name] = (root / name, tiny_opt(root / name, name)(ids).logits)
    return out


@pytest.mark.parametrize("variant", list(OPT_VARIANTS))
def test_every_released_variant_imports_with_transformers_logits_and_exports_back(variant, variants, tmp_path):
    folder, want = variants[variant]
    model = import_hf(folder, dropout=0.0, attention_dropout=0.0).eval()
    with torch.no_grad():
        assert (model(variants["ids"]) - want).abs().max() < 1e-5
    hf_config = json.loads((folder / "config.json").read_text())
    c = model.config
    assert (c.bias, c.layer_norm_affine, c.activation) == tuple(OPT_VARIANTS[variant].values())
    assert c.layer_norm_bias == hf_config["layer_norm_elementwise_affine"]  # HF's affine LayerNorms have biases
    # and back: the same config variant, the same tensors
    export_hf(model, tmp_path / "again")
    again = json.loads((tmp_path / "again/config.json").read_text())
    assert {k: again[k] for k in OPT_VARIANTS[variant]} == OPT_VARIANTS[variant]
    ours, orig = load_file(str(tmp_path / "again/model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert ours.keys() == orig.keys() - {"lm_head.weight"}
    assert all(torch.equal(ours[k][2:], orig[k][2:]) if "embed_positions" in k else torch.equal(ours[k], orig[k])
               for k in ours)


@pytest.mark.multirank
def test_every_released_variant_imports_at_tp2_with_transformers_logits(variants, tmp_path):
    torch.save(variants["ids"], tmp_path / "ids.pt")
    folders = [str(variants[name][0]) for name in OPT_VARIANTS]
    torchrun(2, REPO / "tests/dist/hf_import_logits.py", str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), *folders)
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    assert result["tp_size"] == 2
    for name in OPT_VARIANTS:
        folder, want = variants[name]
        assert (result["logits"][str(folder)] - want).abs().max() < 1e-5, name


def _edited(src, dst, config_edits: dict, weight_edits=None):
    """A copy of an HF folder with config.json keys changed and (optionally) tensors changed."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **config_edits}))
    weights = load_file(str(src / "model.safetensors"))
    save_file({**weights, **(weight_edits or {})}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_non_zero_tensor_the_config_says_is_absent_is_refused(exported, tmp_path):
    _, out = exported
    fc1_bias = {"model.decoder.layers.0.fc1.bias": torch.ones(256)}  # enable_bias=false says there is none
    with pytest.raises(ValueError, match="non-zero model.decoder.layers.0.fc1.bias"):
        import_hf(_edited(out, tmp_path / "stray_bias", {}, fc1_bias))


def test_unsupported_configs_are_refused_by_the_field(exported, tmp_path):
    _, out = exported
    for key, value in (("activation_function", "silu"), ("word_embed_proj_dim", 32),
                       ("do_layer_norm_before", False), ("tie_word_embeddings", False)):
        with pytest.raises(ValueError, match=key):
            import_hf(_edited(out, tmp_path / key, {key: value}))


def test_tp_shards_merge_back():
    torch.manual_seed(0)
    full = own_state(GalacticaLM(GalacticaConfig(**SMALL)))
    for tp in (2, 4):
        shards = [shard_state_dict(full, r, tp) for r in range(tp)]
        assert shards[1]["blocks.0.attn.qkv.weight"].shape == (3 * 64 // tp, 64)
        assert shards[1]["blocks.0.attn.proj.weight"].shape == (64, 64 // tp)
        # rank 1 holds q, k and v of its own heads
        q_rows = full["blocks.0.attn.qkv.weight"][:64]
        assert torch.equal(shards[1]["blocks.0.attn.qkv.weight"][: 64 // tp], q_rows[64 // tp: 2 * 64 // tp])
        merged = merge_tp_state_dicts(shards)
        assert merged.keys() == full.keys() and all(torch.equal(merged[k], full[k]) for k in full)
    shards[1]["ln_f.weight"] = shards[1]["ln_f.weight"] + 1
    with pytest.raises(ValueError, match="ln_f.weight differs"):
        merge_tp_state_dicts(shards)


def test_written_files_get_the_users_umask_not_safetensors_0600(exported, tmp_path):
    """safetensors' save_file creates its file 0600: write_hf gives every file 0666 less the umask."""
    import os

    from model.hf import write_hf

    model, _ = exported
    full = own_state(model)
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            out = write_hf(full, model.config, tmp_path / oct(umask))
        finally:
            os.umask(old)
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
        assert modes == {"config.json": mode, "generation_config.json": mode, "model.safetensors": mode}
    old = os.umask(0o022)
    try:  # sharded weights and their index too
        out = write_hf(full, model.config, tmp_path / "sharded", max_shard_bytes=50_000)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors.index.json" in modes and len(modes) > 4 and set(modes.values()) == {0o644}
