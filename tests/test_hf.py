"""Export to / import from Hugging Face OPTForCausalLM."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import OPTForCausalLM

from model import GalacticaConfig, GalacticaLM
from model.hf import POSITION_OFFSET, export_hf, import_hf, merge_tp_state_dicts, shard_state_dict

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


def _with_biases(src, dst):
    """A copy of an exported folder with non-zero biases, like the released Galactica checkpoints."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["enable_bias"] = True
    (dst / "config.json").write_text(json.dumps(config))
    weights = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    for i in range(SMALL["n_layers"]):
        prefix = f"model.decoder.layers.{i}."
        for name, size in (("self_attn.q_proj", 64), ("self_attn.k_proj", 64), ("self_attn.v_proj", 64),
                           ("self_attn.out_proj", 64), ("fc1", 256), ("fc2", 64),
                           ("self_attn_layer_norm", 64), ("final_layer_norm", 64)):
            weights[prefix + name + ".bias"] = 0.1 * torch.randn(size, generator=gen)
    weights["model.decoder.final_layer_norm.bias"] = 0.1 * torch.randn(64, generator=gen)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_biased_checkpoint_imports_with_bias_switch_only(exported, tmp_path):
    _, out = exported
    folder = _with_biases(out, tmp_path / "biased")
    with pytest.raises(ValueError, match="non-zero .*bias.*bias=True"):
        import_hf(folder)
    model = import_hf(folder, bias=True).eval()
    assert model.blocks[0].mlp.fc_in.bias is not None
    hf = OPTForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    # and the biased model exports back to an identical folder
    export_hf(model, tmp_path / "again")
    again, orig = load_file(str(tmp_path / "again/model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert again.keys() == orig.keys()
    assert all(torch.equal(again[k][2:] if "embed_positions" in k else again[k],
                           orig[k][2:] if "embed_positions" in k else orig[k]) for k in orig)


def test_unsupported_configs_are_refused(exported, tmp_path):
    _, out = exported
    for key, value in (("activation_function", "relu"), ("word_embed_proj_dim", 32),
                       ("do_layer_norm_before", False)):
        folder = tmp_path / key
        folder.mkdir()
        config = json.loads((out / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=key):
            import_hf(folder)


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
