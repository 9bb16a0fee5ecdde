"""GalacticaLM: a decoder-only transformer (OPT architecture, no biases) on megatron-core TP layers.
(Biases, LayerNorms without parameters and ReLU exist for released OPT/Galactica checkpoints: model/config.py.)

    x = wte(ids) + wpe[:seq]                                    (no dropout on embeddings)
    for each block:  x = x + drop(attn(ln_1(x)));  x = x + drop(mlp(ln_2(x)))
    x = ln_f(x);     logits = x @ wte.weight.T                  (tied input/output embedding)

Tensor parallelism (TP) is confined to the layer types: QKV and FFN-in are `ColumnParallelLinear`
(each TP rank owns n_heads/tp heads and d_ffn/tp FFN columns), attention-out and FFN-out are
`RowParallelLinear` (their all-reduce restores the replicated residual stream), the token
embedding is a `VocabParallelEmbedding` (rows split over ranks), and the loss is megatron's
`vocab_parallel_cross_entropy` on the vocabulary shard, so full logits are never gathered for
training. The vocabulary must divide by the TP size (50000 divides by 1, 2, 4, 8); no padding.

Labels follow Megatron's convention: `labels[b, t]` is the target for position t (already shifted
by the data loader, which cuts samples of seq_len + 1 tokens); -100 marks ignored positions.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch.utils.checkpoint import checkpoint

from model import parallel
from model.config import IGNORE_INDEX, GalacticaConfig


# How each TP-split parameter is cut: name suffix -> (dim, stride). Everything else is replicated.
# stride 3: the QKV weight is [q; k; v] in the full model and each rank holds [q_r; k_r; v_r].
TP_PARTITION: dict[str, tuple[int, int]] = {
    "wte.weight": (0, 1),
    "attn.qkv.weight": (0, 3),
    "attn.qkv.bias": (0, 3),
    "attn.proj.weight": (1, 1),
    "mlp.fc_in.weight": (0, 1),
    "mlp.fc_in.bias": (0, 1),
    "mlp.fc_out.weight": (1, 1),
}


def tp_partition(name: str) -> tuple[int, int] | None:
    """(dim, stride) along which parameter `name` is split over TP ranks, or None if replicated."""
    for suffix, rule in TP_PARTITION.items():
        if name == suffix or name.endswith("." + suffix):
            return rule
    return None


def _normal_init(std: float):
    return lambda tensor: nn.init.normal_(tensor, mean=0.0, std=std)


class Attention(nn.Module):
    def __init__(self, cfg: GalacticaConfig, mp: ModelParallelConfig):
        super().__init__()
        self.n_local_heads = cfg.n_heads // parallel.tp_size()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.qkv = tensor_parallel.ColumnParallelLinear(
            cfg.d_model, 3 * cfg.d_model, config=mp, init_method=_normal_init(cfg.init_std),
            bias=cfg.bias, gather_output=False, stride=3)
        self.proj = tensor_parallel.RowParallelLinear(
            cfg.d_model, cfg.d_model, config=mp, init_method=_normal_init(cfg.output_init_std),
            bias=cfg.bias, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv, _ = self.qkv(x)
        q, k, v = qkv.view(b, s, 3, self.n_local_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout_p = self.dropout if self.training else 0.0
        # The probabilities of this rank's heads are TP-split: their dropout uses the TP stream.
        with parallel.tp_rng_fork(x.device) if dropout_p > 0 else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        y, _ = self.proj(y.transpose(1, 2).reshape(b, s, -1))
        return y


class MLP(nn.Module):
    def __init__(self, cfg: GalacticaConfig, mp: ModelParallelConfig):
        super().__init__()
        self.fc_in = tensor_parallel.ColumnParallelLinear(
            cfg.d_model, cfg.d_ffn, config=mp, init_method=_normal_init(cfg.init_std),
            bias=cfg.bias, gather_output=False)
        self.fc_out = tensor_parallel.RowParallelLinear(
            cfg.d_ffn, cfg.d_model, config=mp, init_method=_normal_init(cfg.output_init_std),
            bias=cfg.bias, input_is_parallel=True, skip_bias_add=False)

        self.act = getattr(F, cfg.activation)  # config.ACTIVATIONS: torch.nn.functional's names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc_in(x)
        y, _ = self.fc_out(self.act(h))
        return y


def layer_norm(cfg: GalacticaConfig, device) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, elementwise_affine=cfg.layer_norm_affine,
                        bias=bool(cfg.layer_norm_bias), device=device)


class Block(nn.Module):
    def __init__(self, cfg: GalacticaConfig, mp: ModelParallelConfig, device):
        super().__init__()
        self.ln_1 = layer_norm(cfg, device)
        self.attn = Attention(cfg, mp)
        self.ln_2 = layer_norm(cfg, device)
        self.mlp = MLP(cfg, mp)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Residual dropout acts on replicated activations: the default generator, equal on all TP ranks.
        x = x + F.dropout(self.attn(self.ln_1(x)), self.dropout, self.training)
        return x + F.dropout(self.mlp(self.ln_2(x)), self.dropout, self.training)


def _replay_tp_rng():
    """checkpoint() context: the recomputation replays the TP stream's attention-dropout masks
    (torch.utils.checkpoint itself restores only the default generators)."""
    rng = parallel.tp_rng()
    saved = rng.get_state()

    @contextlib.contextmanager
    def recompute():
        current = rng.get_state()
        rng.set_state(saved)
        try:
            yield
        finally:
            rng.set_state(current)

    return contextlib.nullcontext(), recompute()


def _drop_extra_state(module, state_dict, prefix, local_metadata):
    for key in [k for k, v in state_dict.items() if k.endswith("._extra_state") and v is None]:
        del state_dict[key]


def _restore_extra_state(module, state_dict, prefix, *args):
    for name, sub in module.named_modules(prefix=prefix.rstrip(".")):
        if type(sub).get_extra_state is not nn.Module.get_extra_state:
            state_dict.setdefault(f"{name}._extra_state" if name else "_extra_state", None)


class GalacticaLM(nn.Module):
    """The Galactica decoder. `forward(input_ids)` -> logits (batch, seq, vocab), gathered over TP;
    `forward(input_ids, labels)` -> mean cross-entropy over the positions whose label is not -100.

    Builds on the default device: `with torch.device("meta"): GalacticaLM(cfg)` allocates nothing
    (for `num_parameters` / `flops_per_token` of any size); on the CPU every rank initializes the
    full weights from the same seed and keeps its shard (so TP=1 and TP=k models agree exactly);
    with CUDA, megatron initializes the shards on the GPU. Without a distributed setup it starts a
    single-process world (TP=1) itself; under torchrun call `model.parallel.init_distributed(tp)` first.
    """

    def __init__(self, config: GalacticaConfig):
        super().__init__()
        parallel.ensure_initialized()
        config.validate()
        config.validate_tensor_parallel(parallel.tp_size())
        self.config = cfg = config
        on_meta = torch.get_default_device().type == "meta"
        on_gpu = torch.cuda.is_available() and not on_meta
        if on_gpu:
            parallel.tp_rng()  # megatron's GPU init draws TP-split weights from its CUDA tracker
        mp = ModelParallelConfig(
            tensor_model_parallel_size=parallel.tp_size(),
            use_cpu_initialization=not on_gpu,
            perform_initialization=not on_meta,
            gradient_accumulation_fusion=False,
            params_dtype=torch.float32,
        )
        device = torch.cuda.current_device() if on_gpu else None
        self.wte = tensor_parallel.VocabParallelEmbedding(
            cfg.vocab_size, cfg.d_model, init_method=_normal_init(cfg.init_std), config=mp)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.d_model, device=device)
        self.blocks = nn.ModuleList(Block(cfg, mp, device) for _ in range(cfg.n_layers))
        self.ln_f = layer_norm(cfg, device)
        if not on_meta:
            nn.init.normal_(self.wpe.weight, mean=0.0, std=cfg.init_std)
        # megatron's linear layers add an always-None `_extra_state` entry (for Transformer Engine)
        # to state dicts; it breaks DeepSpeed's universal-checkpoint converter and HF export, so the
        # model's state dict leaves it out and loading fills it back in.
        self._register_state_dict_hook(_drop_extra_state)
        self._register_load_state_dict_pre_hook(_restore_extra_state, with_module=True)
        # Megatron marks split weights (DeepSpeed's grad-norm uses the mark); keep it in step with
        # TP_PARTITION, which the shard merge / export relies on, also when init was skipped (meta).
        for name, p in self.named_parameters():
            rule = tp_partition(name)
            if rule and not hasattr(p, "tensor_model_parallel"):
                tensor_parallel.set_tensor_model_parallel_attributes(p, True, *rule)
            if bool(getattr(p, "tensor_model_parallel", False)) != bool(rule):
                raise AssertionError(f"{name}: megatron's TP mark disagrees with TP_PARTITION")

    # ---------------------------------------------------------------- forward
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-LayerNorm output (batch, seq, d_model), replicated on all TP ranks."""
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_positions:
            raise ValueError(f"sequence length {seq_len} exceeds GalacticaConfig.max_positions="
                             f"{self.config.max_positions}")
        x = self.wte(input_ids) + self.wpe.weight[:seq_len]
        checkpointing = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                context_fn = _replay_tp_rng if self.config.attention_dropout > 0 else None
                x = checkpoint(block, x, use_reentrant=False,
                               **({"context_fn": context_fn} if context_fn else {}))
            else:
                x = block(x)
        return self.ln_f(x)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.hidden_states(input_ids)
        # Tied head on this rank's vocabulary shard; the copy all-reduces the input grad over TP.
        logits = F.linear(copy_to_tensor_model_parallel_region(x), self.wte.weight)
        if labels is None:
            return parallel.gather_last_dim(logits)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        keep = labels != IGNORE_INDEX
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(~keep, 0))
        return (per_token * keep).sum() / keep.sum().clamp(min=1)

    # ---------------------------------------------------------------- accounting
    def num_parameters(self, include_positions: bool = True) -> int:
        """Parameters of the whole model (all TP shards counted once), meta device included."""
        tp = parallel.tp_size()
        total = 0
        for name, p in self.named_parameters():
            if not include_positions and name == "wpe.weight":
                continue
            total += p.numel() * (tp if tp_partition(name) else 1)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B style, causal attention:

            6 * N  +  6 * n_layers * seq_len * d_model

        N counts every parameter used in a matmul: all but the position table (the tied token
        embedding is counted once: as the LM head). The attention term is 12 * L * s * d for
        QK^T and AV over the full s x s score matrix, halved because causal attention only needs
        the lower triangle.
        """
        n_matmul = self.num_parameters(include_positions=False)
        return 6.0 * n_matmul + 6.0 * self.config.n_layers * seq_len * self.config.d_model


__all__ = ["GalacticaLM", "GalacticaConfig", "IGNORE_INDEX", "TP_PARTITION", "tp_partition"]
