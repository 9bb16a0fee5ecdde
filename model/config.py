"""GalacticaConfig: the model's shape and regularization. The presets (the paper's sizes, the CPU ones)
are conf/model/<size>.yaml; ``pretrain.config.model_preset(size)`` builds one."""
from __future__ import annotations

import math
from dataclasses import dataclass

IGNORE_INDEX = -100  # a label the loss skips (padding); torch's cross_entropy default
# The FFN's, by their torch.nn.functional names; HF OPT's "gelu" is the exact (erf) GELU, as F.gelu's default
ACTIVATIONS = ("gelu", "relu")


@dataclass
class GalacticaConfig:
    """Shape and regularization of a Galactica decoder (OPT architecture without biases).

    Init follows metaseq/OPT (and Megatron): every weight ~ N(0, init_std); the two projections
    that write into the residual stream (attention output, FFN output) use
    init_std / sqrt(2 * n_layers) when `scale_output_init` is on (GPT-2 / OPT "scaled init").
    metaseq's default init_std is 0.02; OPT-175B used 0.006. LayerNorm weights start at 1.

    `bias=False` (no biases in the dense layers or the LayerNorms, §2.1 of the paper) is the paper's
    choice and our default. The other architecture fields exist to continue from released checkpoints,
    as Hugging Face's `OPTConfig` describes them (model/hf.py maps one onto the other):
    - `bias`: biases of the dense layers (`enable_bias`; the released 125M-6.7B have them, 30B not);
    - `layer_norm_affine`: LayerNorm weights (`layer_norm_elementwise_affine`; the released 30B has
      none: no LayerNorm parameters at all, galai issue #37);
    - `layer_norm_bias`: LayerNorm biases; None means `bias and layer_norm_affine`. HF's LayerNorms
      carry a bias whenever they are affine, so an OPT with `enable_bias=false` has them; import keeps
      them unless all are zero (our own exports; also a never-trained HF model, which then loses them);
    - `activation`: "gelu" (Galactica, the exact erf form, as HF's "gelu") or "relu" (OPT).
    Tensor-parallel size is not a model property: it comes from `model.parallel`.
    """

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    vocab_size: int = 50000
    max_positions: int = 2048
    ffn_mult: int = 4
    dropout: float = 0.1            # residual dropout (after attention and after the FFN)
    attention_dropout: float = 0.1  # on attention probabilities; none on the embeddings
    init_std: float = 0.02
    scale_output_init: bool = True
    layer_norm_eps: float = 1e-5
    activation_checkpointing: bool = False
    bias: bool = False
    layer_norm_affine: bool = True
    layer_norm_bias: bool | None = None
    activation: str = "gelu"
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if self.layer_norm_bias is None:
            self.layer_norm_bias = self.bias and self.layer_norm_affine
        self.validate()

    @property
    def d_ffn(self) -> int:
        return self.ffn_mult * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def output_init_std(self) -> float:
        return self.init_std / math.sqrt(2 * self.n_layers) if self.scale_output_init else self.init_std

    def validate(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "vocab_size", "max_positions", "ffn_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GalacticaConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"GalacticaConfig.d_model={self.d_model} must be divisible by "
                             f"GalacticaConfig.n_heads={self.n_heads}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GalacticaConfig.{name} must be in [0, 1), got {value!r}")
        if not self.init_std > 0:
            raise ValueError(f"GalacticaConfig.init_std must be > 0, got {self.init_std!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GalacticaConfig.activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.layer_norm_bias and not self.layer_norm_affine:
            raise ValueError("GalacticaConfig.layer_norm_bias=True needs layer_norm_affine=True")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GalacticaConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    def validate_tensor_parallel(self, tp_size: int) -> None:
        """Heads, FFN width and vocabulary are split over TP ranks: each must divide evenly."""
        for name, value in (("n_heads", self.n_heads), ("vocab_size", self.vocab_size), ("d_ffn", self.d_ffn)):
            if value % tp_size:
                raise ValueError(f"GalacticaConfig.{name}={value} is not divisible by the tensor-parallel "
                                 f"size {tp_size} (pad the vocabulary or pick another TP size)")
