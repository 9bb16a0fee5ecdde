"""The training run's configuration: dataclasses registered in Hydra's ConfigStore, checked at start.

The YAML groups in ``conf/`` (model, data, optim, deepspeed, trainer, logger, checkpoint) fill these
schemas; Hydra rejects unknown keys and wrong types, :func:`validate` rejects values that cannot work
together, and every error names the config key to change.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from model.config import GalacticaConfig

PAPER_VOCAB_SIZE = 50000  # the paper's BPE vocabulary (§3.1)

# The Hydra config directory of every gal-* command (an absolute path: under a console script Hydra
# would resolve a relative one against the module's package).
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """Input that cannot work (a config value, a flag, a run directory, a checkpoint): the one-line
    message names the key, flag or path, and what to do. The gal-* commands print it and exit non-zero."""


@dataclass
class ModelConf:
    """The whole shape: conf/model/<size>.yaml sets every field (the paper's Table 5 for paper sizes);
    any of them can be overridden (``model.n_layers=6``) for a custom shape."""

    size: str = MISSING  # the preset's name (conf/model/<size>.yaml); a label in config.yaml and wandb
    n_layers: int = MISSING
    d_model: int = MISSING
    n_heads: int = MISSING
    ffn_mult: int = 4  # FFN width = ffn_mult × d_model (the paper: 4)
    max_positions: int = 2048  # learned positions (the paper's context)
    dropout: float = 0.1  # residual dropout (the paper: 0.1)
    attention_dropout: float = 0.1
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary, read from the shards' manifest
    activation_checkpointing: bool = False
    # The architecture (model/config.py): the paper's by default; other values for released OPT checkpoints.
    bias: bool = False  # dense-layer biases
    layer_norm_affine: bool = True  # LayerNorm weights
    layer_norm_bias: Optional[bool] = None  # None: bias and layer_norm_affine
    activation: str = "gelu"  # gelu | relu
    # A Hugging Face OPTForCausalLM folder (a released Galactica or OPT, or a gal-export): the first step
    # trains from its weights with a fresh optimizer. Its config.json sets the shape and architecture
    # above (the preset still sets batch, LR and dropout); a resume loads the run's checkpoint instead.
    init_from: Optional[str] = None


@dataclass
class RepeatConf:
    """A repeated subset (Hernandez et al. 2022): ``fraction`` of each global batch's samples come from a
    fixed subset of ``samples`` samples of ``source`` (chosen by data.seed, left out of that source's
    unique stream). With the run's length this sets how often the subset is seen (logged as
    ``repeated_passes``)."""

    source: Optional[str] = None  # None: no repeated subset
    samples: int = 0
    fraction: float = 0.0


@dataclass
class DataConf:
    path: str = "data/sample_shards"  # a gal-prepare output directory (manifest.json, train/<source>/, valid/<source>/)
    seed: int = 1234  # each stream's epoch permutations are seeded by (seed, stream, epoch)
    # source → weight: the share of each global batch's samples drawn from that source (normalised to sum
    # to 1; sources left out are not trained on). Empty: weights proportional to the sources' sizes.
    mixture: Dict[str, float] = field(default_factory=dict)
    repeat: RepeatConf = field(default_factory=RepeatConf)
    prefetch: int = 4  # global batches read ahead by a background thread
    record_sample_ids: bool = False  # write RUN_DIR/sample_ids.jsonl: which samples each step trained on


@dataclass
class OptimConf:
    lr_max: float = 6e-4
    lr_final_ratio: float = 0.1  # linear decay to 10% of lr_max at the end of the run (Galactica)
    warmup_tokens: float = 375_000_000  # token counts take float forms (3.75e8); whole numbers only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to LayerNorm weights and embeddings
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConf:
    zero_stage: int = 2  # 0 (plain DDP), 1, 2 or 3
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states in CPU memory
    offload_param: bool = False  # ZeRO-Infinity style parameter offload (stage 3 only)
    precision: str = "auto"  # auto (bf16 on a GPU or a CPU with native bf16 matmul, else fp32) | bf16 | fp32
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed JSON config


@dataclass
class TrainerConf:
    micro_batch_size: int = 1  # sequences per rank per micro-step
    global_batch_tokens: float = 500_000  # tokens per optimizer step (Table 5); rounded to whole sequences
    max_tokens: Optional[float] = None  # stop after this many training tokens (450e9 works) ...
    max_epochs: Optional[float] = None  # ... or this many passes over the training set
    tensor_parallel: int = 1
    device: str = "auto"  # auto | cpu | cuda
    log_interval_steps: int = 1
    loss_spike_factor: float = 4.0  # skip the update when loss > factor × EWMA of recent losses
    loss_ewma_beta: float = 0.9
    loss_spike_warmup_steps: int = 20  # no spike test before the EWMA has seen this many steps
    max_consecutive_skips: int = 5  # then stop, with the last good state checkpointed
    inject_nan_at_steps: list[int] = field(default_factory=list)  # fault injection for tests and drills


@dataclass
class LoggerConf:
    wandb: bool = True  # false: no wandb at all (metrics.jsonl and the console only)
    # auto: WANDB_MODE if set; else online with a key (WANDB_API_KEY, `wandb login`), else offline (files in the
    # run dir, `wandb sync` later). online | offline | disabled choose; WANDB_MODE, when set, always wins.
    # A failed online start falls back to offline with a warning (pretrain/trainer/metrics.py).
    mode: str = "auto"
    init_timeout_s: Optional[float] = None  # how long wandb.init may take; None: wandb's (WANDB_INIT_TIMEOUT, 90 s)
    project: str = "galactica-pretrain"
    # None: in a multirun (-m), the sweep (its run_dir's name) and the point's swept values (optim.lr_max=0.001);
    # a single run is named after its run_dir (launch/sweep.py)
    group: Optional[str] = None
    name: Optional[str] = None
    console: bool = True  # the rich progress line


@dataclass
class CheckpointConf:
    interval_tokens: Optional[float] = None  # None: only at the end (and on preemption)
    keep_last: int = 3


@dataclass
class ValidationConf:
    enabled: bool = True  # the rounds described in pretrain/evaluation/validation.py
    interval_tokens: Optional[float] = None  # None: rounds_per_epoch evenly spaced rounds an epoch
    # 16 (+ after_boundary_points=4) is the density the double-descent detector needs
    # (tests/test_doubledescent_rates.py); 0 with interval_tokens null: boundary rounds only.
    rounds_per_epoch: int = 16
    after_boundary_points: int = 4  # extra rounds right after each boundary, where epoch-wise effects show
    after_boundary_tokens: Optional[float] = None  # the span they fill; None: half an interval, or a tenth of an epoch
    at_start: bool = True  # a round before the first step (a fresh model, or a loaded checkpoint whose step has none)
    # A round's cost, as a fraction of the training compute between rounds: it sizes the fixed evaluation
    # sets (equal shares, at least one sample each). None: every held-out sample, every round.
    max_cost: Optional[float] = 0.05
    seen_samples: int = 32  # at most this many fixed training samples per stream (seen/<stream>)
    max_samples_per_source: int | None = None  # at most this many held-out samples per source
    micro_batch_size: int = 4
    # chemistry probes (pretrain/evaluation/probes.py) in every round: SMILES → formula exact match on held-out
    # molecules, and the RDKit parse rate of sampled SMILES
    probes: bool = False
    probe_molecules: int = 64  # held-out molecules (a fixed random subset of the shards' probes/)
    probe_max_new_tokens: int = 48  # greedy tokens for a formula (it ends at a newline)
    probe_smiles_samples: int = 16  # sampled continuations of [START_I_SMILES]
    probe_smiles_max_new_tokens: int = 128  # a SMILES not closed by then counts as invalid
    probe_batch_size: int = 16  # prompts decoded together


@dataclass
class TrainConfig:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    optim: OptimConf = field(default_factory=OptimConf)
    deepspeed: DeepSpeedConf = field(default_factory=DeepSpeedConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    validation: ValidationConf = field(default_factory=ValidationConf)
    run_dir: str = MISSING
    resume: str = "auto"  # auto (latest complete checkpoint in run_dir, if any) | none | a checkpoint dir
    seed: int = 1234  # model init and dropout


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


def validate(cfg: TrainConfig, *, seq_len: int, model_cfg: GalacticaConfig, world_size: int) -> None:
    """Reject settings that cannot work, naming the key. Shapes come from the model and the shards."""
    t, d = cfg.trainer, cfg.deepspeed
    _positive(cfg)
    tp = t.tensor_parallel  # >= 1 and dividing the world size: launch.env.check_topology, called first
    try:
        model_cfg.validate_tensor_parallel(tp)
    except ValueError as e:
        raise ConfigError(f"trainer.tensor_parallel={tp}: {e}") from None
    if seq_len > model_cfg.max_positions:
        raise ConfigError(f"data.path: the shards hold {seq_len}-token sequences, above the model's "
                          f"{model_cfg.max_positions} positions (model.size={cfg.model.size})")
    dp = world_size // tp
    gbs = global_batch_samples(t.global_batch_tokens, seq_len)
    if gbs % (t.micro_batch_size * dp):
        raise ConfigError(f"trainer.global_batch_tokens={t.global_batch_tokens} gives {gbs} sequences of "
                          f"{seq_len} tokens, not divisible by trainer.micro_batch_size={t.micro_batch_size} × "
                          f"{dp} data-parallel ranks; e.g. trainer.global_batch_tokens="
                          f"{divisible_global_batch_samples(gbs, t.micro_batch_size * dp) * seq_len}")
    if d.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={d.zero_stage} must be 0, 1, 2 or 3")
    if d.offload_param and d.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param=true needs deepspeed.zero_stage=3")
    if d.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"deepspeed.precision={d.precision!r} must be auto, bf16 or fp32")
    if t.max_tokens is None and t.max_epochs is None:
        raise ConfigError("set trainer.max_tokens or trainer.max_epochs: the run needs a length")
    if not 0 < cfg.optim.lr_final_ratio <= 1:
        raise ConfigError(f"optim.lr_final_ratio={cfg.optim.lr_final_ratio} must be in (0, 1]")
    v = cfg.validation
    for key in ("probe_molecules", "probe_max_new_tokens", "probe_smiles_samples", "probe_smiles_max_new_tokens",
                "probe_batch_size"):
        if v.probes and getattr(v, key) < 1:
            raise ConfigError(f"validation.{key}={getattr(v, key)} must be >= 1")
    if v.probes and max(v.probe_max_new_tokens, v.probe_smiles_max_new_tokens) >= model_cfg.max_positions:
        raise ConfigError(f"validation.probe_max_new_tokens / probe_smiles_max_new_tokens must be below the "
                          f"model's {model_cfg.max_positions} positions")
    if cfg.logger.mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={cfg.logger.mode!r} must be {', '.join(WANDB_MODES[:-1])} or {WANDB_MODES[-1]}")
    if cfg.resume not in ("auto", "none") and not cfg.resume:
        raise ConfigError("resume must be auto, none or a checkpoint directory")


WANDB_MODES = ("auto", "online", "offline", "disabled")  # logger.mode

# Keys that must be > 0 (None, where allowed, means "not set": only at the end, every sample, ...)
POSITIVE_KEYS = ("trainer.micro_batch_size", "trainer.global_batch_tokens", "trainer.max_tokens", "trainer.max_epochs",
                 "trainer.log_interval_steps", "trainer.max_consecutive_skips", "optim.lr_max",
                 "checkpoint.interval_tokens", "checkpoint.keep_last", "validation.interval_tokens",
                 "validation.after_boundary_tokens", "validation.micro_batch_size", "validation.max_cost",
                 "validation.seen_samples", "validation.max_samples_per_source", "logger.init_timeout_s")
NON_NEGATIVE_KEYS = ("optim.warmup_tokens", "optim.weight_decay", "optim.grad_clip", "validation.rounds_per_epoch",
                     "validation.after_boundary_points")


# Token counts: typed float so that 450e9 is accepted on the command line; made ints by typed().
TOKEN_KEYS = ("trainer.global_batch_tokens", "trainer.max_tokens", "optim.warmup_tokens", "checkpoint.interval_tokens",
              "validation.interval_tokens", "validation.after_boundary_tokens")


def typed(cfg: DictConfig) -> TrainConfig:
    """The composed config as a TrainConfig, token counts as the whole numbers they are (450e9 → int)."""
    out: TrainConfig = OmegaConf.to_object(cfg)
    _whole_token_counts(out)
    return out


def adopt_init_from(model: ModelConf, saved: dict | None = None) -> None:
    """``model.init_from``: the model section takes the checkpoint's shape and architecture, so that the
    run's config.yaml, its checkpoints' shape check and gal-export all see the model that trains. They come
    from ``saved`` (the ``model_shape`` of the run's own checkpoint to resume: the folder may be gone by
    then) when it has them all, else from the folder's config.json."""
    folder = model.init_from
    if not folder:
        return
    keys = (*SHAPE_KEYS, *ARCHITECTURE_KEYS)
    if saved is not None and all(k in saved for k in keys):
        arch = {k: saved[k] for k in keys}
    else:
        from model.hf import read_hf_config  # torch and megatron: only when asked for

        try:
            arch = model_shape(read_hf_config(folder))
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.init_from={folder}: {e}") from None
    if model.vocab_size is not None and model.vocab_size != arch["vocab_size"]:
        raise ConfigError(f"model.vocab_size={model.vocab_size}, but model.init_from={folder} has a vocabulary of "
                          f"{arch['vocab_size']}: leave model.vocab_size unset")
    for key in keys:
        setattr(model, key, arch[key])
    model.size = f"hf:{Path(folder).name}"


def _whole_token_counts(cfg: TrainConfig) -> None:
    for key in TOKEN_KEYS:
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        value = getattr(node, last)
        if value is None:
            continue
        if value != int(value):
            raise ConfigError(f"{key}={value} must be a whole number of tokens")
        setattr(node, last, int(value))


def _positive(cfg: TrainConfig) -> None:
    for keys, ok, what in ((POSITIVE_KEYS, lambda v: v > 0, "> 0"), (NON_NEGATIVE_KEYS, lambda v: v >= 0, ">= 0")):
        for key in keys:
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            if node is not None and not ok(node):
                raise ConfigError(f"{key}={node} must be {what}")


def global_batch_samples(global_batch_tokens: int, seq_len: int) -> int:
    """Sequences per optimizer step: trainer.global_batch_tokens rounded to whole sequences (≥ 1)."""
    return max(1, round(global_batch_tokens / seq_len))


def divisible_global_batch_samples(samples: int, per_step: int) -> int:
    """The sequence count nearest ``samples`` that splits evenly into micro-batch × DP (``per_step``)."""
    return max(1, round(samples / per_step)) * per_step


def model_config(cfg: TrainConfig, manifest: dict) -> GalacticaConfig:
    """The model section as a GalacticaConfig; the vocabulary from the shards' manifest unless model.vocab_size."""
    m = asdict(cfg.model)
    del m["size"], m["init_from"]
    m["vocab_size"] = m["vocab_size"] or manifest["vocab_size"]
    if m["vocab_size"] < manifest["vocab_size"] and cfg.model.init_from:
        raise ConfigError(f"model.init_from={cfg.model.init_from} has a vocabulary of {m['vocab_size']}, below the "
                          f"shards' {manifest['vocab_size']} (manifest.json): prepare the shards with its tokenizer "
                          f"(gal-prepare tokenizer.from_hf={cfg.model.init_from})")
    if m["vocab_size"] < manifest["vocab_size"]:
        raise ConfigError(f"model.vocab_size={m['vocab_size']} is below the shards' vocabulary of "
                          f"{manifest['vocab_size']} (manifest.json): leave it unset, or set it at least that large")
    try:
        return GalacticaConfig(**m)
    except ValueError as e:
        raise ConfigError(f"model (model.size={cfg.model.size}): {e}") from None


def model_preset(size: str, **overrides) -> GalacticaConfig:
    """The GalacticaConfig of conf/model/<size>.yaml (vocabulary 50000 unless overridden): for tools
    and tests that need a preset without composing a whole run config."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "model" / f"{size}.yaml"
    if not path.exists():
        raise ConfigError(f"model size {size!r} is unknown; choose one of {model_sizes()}")
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConf), OmegaConf.load(path).model))
    model.vocab_size = model.vocab_size or PAPER_VOCAB_SIZE
    fields = {**asdict(model), **overrides}
    del fields["size"], fields["init_from"]
    return GalacticaConfig(**fields)


def model_sizes() -> list[str]:
    """The presets in conf/model/."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


# What must not change across a resume. The model's shape is checked against the checkpoint before
# anything loads (a different shape cannot load: an error); a change in the keys below only warns.
# Runtime knobs (paths, prefetch, logging, validation, checkpoint interval) are free to change.
SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "ffn_mult", "max_positions", "vocab_size")
ARCHITECTURE_KEYS = ("bias", "layer_norm_affine", "layer_norm_bias", "activation")
HASHED_KEYS = ("model.dropout", "model.attention_dropout", "optim", "data.seed", "data.mixture", "data.repeat", "seed")


def model_shape(model_cfg: GalacticaConfig) -> dict[str, int | bool | str]:
    """What a checkpoint's weights need of the model: its shape and architecture (saved in each layout file)."""
    return {k: getattr(model_cfg, k) for k in (*SHAPE_KEYS, *ARCHITECTURE_KEYS)}


def config_hash(cfg: TrainConfig, data_identity: str) -> str:
    """A digest of HASHED_KEYS and the data's identity (its shards' and tokenizer's hashes, not its path);
    token counts are whole numbers already (:func:`typed`)."""
    keep = {"data_identity": data_identity}
    for key in HASHED_KEYS:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        keep[key] = asdict(node) if hasattr(node, "__dataclass_fields__") else node
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
