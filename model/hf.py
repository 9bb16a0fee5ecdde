"""Hugging Face `OPTForCausalLM` export and import (the class HF publishes Galactica as).

Name map (ours -> HF, prefix `model.decoder.`):
    wte.weight -> embed_tokens.weight             (lm_head is tied to it, not written)
    wpe.weight -> embed_positions.weight          (OPT keeps 2 extra leading rows: row i+2 is position i)
    blocks.i.ln_1 -> layers.i.self_attn_layer_norm,  blocks.i.ln_2 -> layers.i.final_layer_norm
    blocks.i.attn.qkv (rows [q; k; v]) -> layers.i.self_attn.{q,k,v}_proj
    blocks.i.attn.proj -> layers.i.self_attn.out_proj
    blocks.i.mlp.fc_in / fc_out -> layers.i.fc1 / fc2,   ln_f -> final_layer_norm
The architecture follows config.json (HF `OPTConfig`): `enable_bias` (dense-layer biases),
`layer_norm_elementwise_affine` (LayerNorm parameters; the released Galactica 30B has none),
`activation_function` (gelu or relu). An affine HF LayerNorm always has a bias: our bias-free model
(the paper's) exports zeros there, and import keeps LayerNorm biases unless they are all zero in a
checkpoint without dense biases (our own exports). What GalacticaLM cannot represent (post-LayerNorm
OPT-350m, projections, untied heads) is refused, naming the config.json field.

Pure functions (`merge_tp_state_dicts`, `shard_state_dict`, `to_hf_state_dict`, `write_hf`) work on
full (TP-merged) state dicts, e.g. after DeepSpeed's zero_to_fp32 consolidation.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from model import parallel
from model.config import ACTIVATIONS, GalacticaConfig
from model.transformer import GalacticaLM, tp_partition

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
HF_LAYER_NORM_EPS = 1e-5  # OPT's nn.LayerNorm uses the default eps
# transformers' OPTConfig defaults, for config.json files that predate a field (the released 6.7B: biases)
OPT_DEFAULTS = {"enable_bias": True, "layer_norm_elementwise_affine": True, "activation_function": "relu"}


def _is_extra(key: str) -> bool:
    return key.endswith("_extra_state")


# ------------------------------------------------------------------ tensor-parallel shards
def _merge_tensor(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    rule = tp_partition(name)
    if rule is None or len(parts) == 1:
        for rank, part in enumerate(parts[1:], start=1):
            if not torch.equal(part, parts[0]):
                raise ValueError(f"replicated parameter {name} differs between TP rank 0 and rank {rank}")
        return parts[0]
    dim, stride = rule
    chunks = [p.chunk(stride, dim=dim) for p in parts]  # per rank: [q_r, k_r, v_r] for stride 3
    return torch.cat([torch.cat([c[j] for c in chunks], dim=dim) for j in range(stride)], dim=dim)


def merge_tp_state_dicts(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merge the state dicts of TP ranks 0..k-1 (in rank order) into the full TP=1 state dict."""
    keys = [k for k in shards[0] if not _is_extra(k)]
    for rank, shard in enumerate(shards):
        if [k for k in shard if not _is_extra(k)] != keys:
            raise ValueError(f"TP rank {rank}'s state dict has other keys than rank 0's")
    return {k: _merge_tensor(k, [s[k] for s in shards]) for k in keys}


def shard_state_dict(full: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """The part of a full state dict that TP rank `tp_rank` of `tp_size` holds (inverse of the merge)."""
    out = {}
    for name, tensor in full.items():
        if _is_extra(name):
            continue
        rule = tp_partition(name)
        if rule is None or tp_size == 1:
            out[name] = tensor
            continue
        dim, stride = rule
        if tensor.shape[dim] % (stride * tp_size):
            raise ValueError(f"{name} of shape {tuple(tensor.shape)} cannot be split {stride}x{tp_size} along dim {dim}")
        out[name] = torch.cat([c.chunk(tp_size, dim=dim)[tp_rank] for c in tensor.chunk(stride, dim=dim)],
                              dim=dim).contiguous()
    return out


def gather_tp_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full (TP-merged) CPU copies of named parameters or gradients (a collective over the TP group)."""
    tp = parallel.tp_size()
    out = {}
    for name, tensor in named.items():
        if _is_extra(name):
            continue
        tensor = tensor.detach()
        if tp > 1 and tp_partition(name):
            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor.contiguous(), group=parallel.tp_group())
            tensor = _merge_tensor(name, parts)
        out[name] = tensor.cpu()
    return out


def full_state_dict(model: GalacticaLM) -> dict[str, torch.Tensor]:
    """The model's full (TP-merged) state dict on every rank of its TP group (a collective)."""
    return gather_tp_tensors(model.state_dict())


def load_full_state_dict(model: GalacticaLM, full: dict[str, torch.Tensor]) -> None:
    """Load a full (TP=1) state dict into a model of any TP size (each rank takes its shard)."""
    shard = shard_state_dict(full, parallel.tp_rank(), parallel.tp_size())
    missing, unexpected = model.load_state_dict(shard, strict=False)
    missing = [k for k in missing if not _is_extra(k)]
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")


# ------------------------------------------------------------------ HF names and config
def hf_config_dict(config: GalacticaConfig) -> dict:
    if config.layer_norm_eps != HF_LAYER_NORM_EPS:
        raise ValueError(f"GalacticaConfig.layer_norm_eps={config.layer_norm_eps} cannot be exported: "
                         f"HF OPT's LayerNorm eps is fixed at {HF_LAYER_NORM_EPS}")
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "word_embed_proj_dim": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "ffn_dim": config.d_ffn,
        "max_position_embeddings": config.max_positions,
        "activation_function": config.activation,
        "do_layer_norm_before": True,
        "layer_norm_elementwise_affine": config.layer_norm_affine,
        "enable_bias": config.bias,
        "dropout": config.dropout,
        "attention_dropout": config.attention_dropout,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
        "init_std": config.init_std,
        "tie_word_embeddings": True,
        "bos_token_id": config.bos_token_id,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _layer_norms(i: int | None) -> dict[str, str]:
    """Our LayerNorm names -> HF's, for block i (None: the final one); weights and biases."""
    if i is None:
        pairs = {"ln_f": "model.decoder.final_layer_norm"}
    else:
        hf = f"model.decoder.layers.{i}."
        pairs = {f"blocks.{i}.ln_1": hf + "self_attn_layer_norm", f"blocks.{i}.ln_2": hf + "final_layer_norm"}
    return {f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in pairs.items() for p in ("weight", "bias")}


def _dense(i: int) -> dict[str, str]:
    """Our dense-layer names -> HF's for block i, except the fused QKV (handled apart)."""
    hf = f"model.decoder.layers.{i}."
    pairs = {"attn.proj": "self_attn.out_proj", "mlp.fc_in": "fc1", "mlp.fc_out": "fc2"}
    return {f"blocks.{i}.{ours}.{p}": f"{hf}{theirs}.{p}" for ours, theirs in pairs.items() for p in ("weight", "bias")}


def to_hf_state_dict(full: dict[str, torch.Tensor], config: GalacticaConfig) -> dict[str, torch.Tensor]:
    """Full state dict (ours) -> `OPTForCausalLM` state dict. An affine LayerNorm without a bias gets a zero
    one (HF's always have it); dense biases are written only with ``config.bias``."""
    d = config.d_model
    wpe = full["wpe.weight"]
    out = {
        "model.decoder.embed_tokens.weight": full["wte.weight"],
        "model.decoder.embed_positions.weight": torch.cat([wpe.new_zeros(POSITION_OFFSET, d), wpe]),
    }
    for i in [None, *range(config.n_layers)]:
        if config.layer_norm_affine:
            for ours, hf in _layer_norms(i).items():
                out[hf] = full[ours] if ours in full else wpe.new_zeros(d)
        if i is None:
            continue
        for ours, hf in _dense(i).items():
            if ours in full:
                out[hf] = full[ours]
        attn = f"model.decoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            if f"blocks.{i}.attn.qkv.{kind}" in full:
                for name, part in zip("qkv", full[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)):
                    out[attn + f"{name}_proj.{kind}"] = part
    return {k: v.contiguous() for k, v in out.items()}


def with_umask_mode(*paths: str | Path) -> None:
    """Give files the mode a plain ``open()`` creates them with: 0666 less the user's umask (0644 under the
    usual 022). safetensors' ``save_file`` creates its file 0600 whatever the umask, and a file rewritten
    in place keeps its old mode, so an export on a shared cluster would be unreadable to colleagues.
    (``os.umask`` can only be read by setting it: it is set back at once.)"""
    mask = os.umask(0o077)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def write_hf(full: dict[str, torch.Tensor], config: GalacticaConfig, out_dir: str | Path,
             max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write an `OPTForCausalLM` folder (config.json, safetensors, generation_config.json), each file with
    the user's umask (:func:`with_umask_mode`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_sd = to_hf_state_dict(full, config)
    written = [out_dir / "config.json", out_dir / "generation_config.json"]
    written[0].write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")
    written[1].write_text(json.dumps({
        "bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id}, indent=2) + "\n")
    shards, current, size = [], {}, 0
    for name, tensor in hf_sd.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        written.append(out_dir / "model.safetensors")
        save_file(shards[0], str(written[-1]), metadata={"format": "pt"})
    else:
        weight_map = {}
        for n, shard in enumerate(shards, start=1):
            written.append(out_dir / f"model-{n:05d}-of-{len(shards):05d}.safetensors")
            save_file(shard, str(written[-1]), metadata={"format": "pt"})
            weight_map.update({k: written[-1].name for k in shard})
        total = sum(t.numel() * t.element_size() for t in hf_sd.values())
        written.append(out_dir / "model.safetensors.index.json")
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        written[-1].write_text(json.dumps(index, indent=2) + "\n")
    with_umask_mode(*written)
    return out_dir


def export_hf(model: GalacticaLM, out_dir: str | Path) -> Path:
    """Gather the TP shards (collective over all ranks) and let global rank 0 write the HF folder."""
    full = full_state_dict(model)
    if dist.get_rank() == 0:
        write_hf(full, model.config, out_dir)
    if dist.get_world_size() > 1:
        dist.barrier()
    return Path(out_dir)


# ------------------------------------------------------------------ import
def read_hf_state_dict(path: str | Path, containing: str = "") -> dict[str, torch.Tensor]:
    """The tensors of an HF folder whose names contain ``containing`` (all by default): model.safetensors,
    sharded safetensors (only those tensors are read), or pytorch_model*.bin (weights-only unpickling)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys() if containing in k})
        return out
    files = sorted(path.glob("pytorch_model*.bin"))
    if files:
        return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()
                if containing in k}
    raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")


def config_from_hf(hf: dict, tensors: dict[str, torch.Tensor] | None = None,
                   source: str = "config.json") -> GalacticaConfig:
    """The GalacticaConfig of an HF OPT config.json (and its tensors, to tell whether an affine
    LayerNorm's biases are all zero), refusing what the model cannot represent by the field."""
    if hf.get("model_type") != "opt":
        raise ValueError(f"{source}: model_type={hf.get('model_type')!r}: only OPT checkpoints (OPTForCausalLM: "
                         "Galactica, OPT) can be loaded")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size",
                           "max_position_embeddings") if k not in hf]
    if missing:
        raise ValueError(f"{source}: lacks {', '.join(missing)}")
    required = {"do_layer_norm_before": True, "_remove_final_layer_norm": False, "tie_word_embeddings": True}
    for key, want in required.items():
        if hf.get(key, want) != want:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (GalacticaLM needs {want!r})")
    activation = hf.get("activation_function", OPT_DEFAULTS["activation_function"])
    if activation not in ACTIVATIONS:
        raise ValueError(f"{source}: activation_function={activation!r} is not supported (one of {list(ACTIVATIONS)})")
    d = hf["hidden_size"]
    if hf.get("word_embed_proj_dim", d) != d:
        raise ValueError(f"{source}: word_embed_proj_dim={hf['word_embed_proj_dim']} != hidden_size={d} "
                         "(project_in/project_out layers are not supported)")
    if hf["ffn_dim"] % d:
        raise ValueError(f"{source}: ffn_dim={hf['ffn_dim']} is not a multiple of hidden_size={d}")
    bias = hf.get("enable_bias", OPT_DEFAULTS["enable_bias"])
    affine = hf.get("layer_norm_elementwise_affine", OPT_DEFAULTS["layer_norm_elementwise_affine"])
    ln_biases = [v for k, v in (tensors or {}).items() if "layer_norm.bias" in k]
    return GalacticaConfig(
        n_layers=hf["num_hidden_layers"], d_model=d, n_heads=hf["num_attention_heads"],
        vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
        ffn_mult=hf["ffn_dim"] // d, dropout=hf.get("dropout", 0.1),
        attention_dropout=hf.get("attention_dropout", 0.0), init_std=hf.get("init_std", 0.02),
        bias=bias, layer_norm_affine=affine,
        layer_norm_bias=affine and (bias or any(bool(torch.count_nonzero(b)) for b in ln_biases)),
        activation=activation, bos_token_id=hf.get("bos_token_id", 0), pad_token_id=hf.get("pad_token_id", 1),
        eos_token_id=hf.get("eos_token_id", 2))


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], config: GalacticaConfig) -> dict[str, torch.Tensor]:
    """`OPTForCausalLM` state dict -> our full state dict. Raises if a non-zero tensor would be lost."""
    hf_sd = _causal_lm_names(hf_sd)
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise ValueError(f"HF checkpoint lacks {name}")
        used.add(name)
        return hf_sd[name]

    def drop_zero(name: str) -> None:
        if name in hf_sd:
            used.add(name)
            if torch.count_nonzero(hf_sd[name]):
                raise ValueError(f"HF checkpoint has a non-zero {name}, which config.json says is absent (enable_bias="
                                 f"{config.bias}, layer_norm_elementwise_affine={config.layer_norm_affine})")

    pos = take("model.decoder.embed_positions.weight")
    if pos.shape[0] != config.max_positions + POSITION_OFFSET:
        raise ValueError(f"embed_positions has {pos.shape[0]} rows, expected max_position_embeddings + 2 = "
                         f"{config.max_positions + POSITION_OFFSET}")
    if torch.count_nonzero(pos[:POSITION_OFFSET]):
        warnings.warn("OPT position rows 0-1 are non-zero and are not imported: HF uses them only for "
                      "padding positions (position -1), never for real tokens", stacklevel=3)
    full = {"wte.weight": take("model.decoder.embed_tokens.weight"), "wpe.weight": pos[POSITION_OFFSET:]}
    keep = {"weight": config.layer_norm_affine, "bias": config.layer_norm_bias}
    for i in [None, *range(config.n_layers)]:
        for ours, hf in _layer_norms(i).items():
            if keep[ours.rsplit(".", 1)[1]]:
                full[ours] = take(hf)
            else:
                drop_zero(hf)
        if i is None:
            continue
        for ours, hf in _dense(i).items():
            if ours.endswith(".weight") or config.bias:
                full[ours] = take(hf)
            else:
                drop_zero(hf)
        attn = f"model.decoder.layers.{i}.self_attn."
        full[f"blocks.{i}.attn.qkv.weight"] = torch.cat([take(attn + f"{n}_proj.weight") for n in "qkv"])
        if config.bias:
            full[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(attn + f"{n}_proj.bias") for n in "qkv"])
        else:
            for n in "qkv":
                drop_zero(attn + f"{n}_proj.bias")
    if "lm_head.weight" in hf_sd:
        used.add("lm_head.weight")
        if not torch.equal(hf_sd["lm_head.weight"], full["wte.weight"]):
            raise ValueError("HF checkpoint has an lm_head.weight different from embed_tokens.weight "
                             "(untied output embedding is not supported)")
    left = sorted(set(hf_sd) - used)
    if left:
        raise ValueError(f"HF checkpoint has tensors GalacticaLM cannot represent: {left[:8]}")
    return {k: v.float() if v.is_floating_point() else v for k, v in full.items()}


def _causal_lm_names(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OPTModel checkpoints (facebook/opt-*) say "decoder.…"; OPTForCausalLM ones "model.decoder.…"."""
    return {(k if k.startswith(("model.", "lm_head.")) else "model." + k): v for k, v in hf_sd.items()}


def read_hf_config(path: str | Path) -> GalacticaConfig:
    """The GalacticaConfig of an HF folder from its config.json; the LayerNorm biases are read (only them,
    from safetensors) when they decide it: affine LayerNorms in a checkpoint without dense biases."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (an OPTForCausalLM folder has config.json and weights)")
    hf = json.loads((path / "config.json").read_text())
    tensors = {}
    if (hf.get("layer_norm_elementwise_affine", OPT_DEFAULTS["layer_norm_elementwise_affine"])
            and not hf.get("enable_bias", OPT_DEFAULTS["enable_bias"])):
        tensors = _causal_lm_names(read_hf_state_dict(path, "layer_norm.bias"))
    return config_from_hf(hf, tensors, source=str(path / "config.json"))


def read_hf(path: str | Path) -> tuple[GalacticaConfig, dict[str, torch.Tensor]]:
    """An OPT / Galactica HF folder as (its GalacticaConfig, our full state dict in fp32)."""
    config = read_hf_config(path)
    return config, from_hf_state_dict(read_hf_state_dict(path), config)


def import_hf(path: str | Path, **config_overrides) -> GalacticaLM:
    """Load an OPT / Galactica HF folder into a GalacticaLM (on this process's TP group).

    The architecture comes from config.json; `config_overrides` set training fields (dropout,
    activation_checkpointing, ...). The trainer's `model.init_from` does the same inside the engine.
    """
    config, full = read_hf(path)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"GalacticaConfig has no field {key!r}")
        setattr(config, key, value)
    config.validate()
    parallel.ensure_initialized()
    model = GalacticaLM(config)
    load_full_state_dict(model, full)
    return model
