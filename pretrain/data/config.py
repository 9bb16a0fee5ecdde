"""`gal-prepare`'s configuration: dataclasses registered in Hydra's ConfigStore, checked at start.

`conf/prepare.yaml` fills :class:`PrepareConf`; the group `conf/corpus/` maps each `source` of the
input to a :class:`SourceFormat` (its Galactica template), so a new source needs YAML, not code.
Hydra rejects unknown keys and wrong types; :func:`validate` rejects values that cannot work and
names the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from pretrain.config import PAPER_VOCAB_SIZE, ConfigError  # noqa: F401 (the project's one error type)

SAMPLE_VOCAB_SIZE = 8000  # the built-in sample corpus (~1M tokens) is too small for 50k merges


@dataclass
class SourceFormat:
    # Parts of the document, joined by a blank line. `{field}` inserts a record field, `{field|f}`
    # passes it through a formatter: smiles, amino, dna (Galactica span markup), properties (a dict
    # as "key: value" lines), cite (wraps the citations citation_regex finds in [START_REF]…[END_REF]),
    # formula (a SMILES field → RDKit's molecular formula; held-out records become probe records).
    # A part whose fields are absent or empty is left out.
    template: List[str] = field(default_factory=lambda: ["{text}"])
    required: List[str] = field(default_factory=lambda: ["text"])  # missing/empty → bad input
    near_dedup: bool = True  # MinHash near-duplicate detection (off for molecules/sequences)
    span_dedup: bool = True  # repeated spans of >= dedup.span_min_bytes cut (off for molecules/sequences)
    # Citations for `|cite` (Python re, MULTILINE; `(?x)` allows a commented one): in each match, the first
    # capturing group that took part is wrapped in [START_REF]…[END_REF] (one group per alternative form).
    citation_regex: Optional[str] = None


@dataclass
class CleanConf:
    unicode_form: str = "NFKC"  # NFC | NFKC | NFD | NFKD; super/subscripts are marked up before it
    min_chars: int = 20  # shorter rendered documents are dropped (counted as too_short)
    max_chars: int = 4_000_000  # longer ones are dropped (too_long)


@dataclass
class DedupConf:
    # Which copy is kept: the first in document order (source priority = the corpus config's order, then
    # bucket and id); pretrain/data/dedup.py and spans.py say how.
    exact: bool = True  # drop documents whose cleaned text another one has (any source)
    near: bool = True  # datatrove's MinHash LSH over word shingles, for sources with near_dedup: true
    minhash_bands: int = 14  # LSH bands of minhash_rows hashes: similarity ~ (1/14)**(1/8) = 0.72 and up
    minhash_rows: int = 8
    shingle_words: int = 5
    span_min_bytes: int = 100  # Galactica's span dedup: repeated spans this long cut at paragraphs; 0: off


@dataclass
class SplitConf:
    valid_fraction: float = 0.05  # per source, by a hash of the document id
    salt: str = "gal-split-v1"


@dataclass
class TokenizerConf:
    vocab_size: Optional[int] = None  # None: 50000 (the paper), 8000 for the built-in sample
    sample_fraction: float = 0.02  # of the training documents, chosen by a hash of (seed, id)
    min_sample_docs: int = 5000  # at least this many documents (all of a small corpus)
    seed: int = 0
    threads: int = 8  # sentencepiece's training threads: its model depends on their number, so it is fixed here
    # Instead of training one (vocab_size, sample_fraction, min_sample_docs and seed are then unused):
    path: Optional[str] = None  # our own tokenizer.model (or its folder), e.g. another shard set's tokenizer/
    # A Hugging Face tokenizer folder (tokenizer.json), e.g. a downloaded facebook/galactica-1.3b, to continue
    # training a released checkpoint: its ids, special ids read from it, spans escaped as galai does.
    from_hf: Optional[str] = None


@dataclass
class ShardConf:
    seq_len: int = 2048  # samples hold seq_len + 1 tokens (inputs and shifted targets)
    samples_per_shard: int = 8192


@dataclass
class SlurmConf:
    """executor=slurm: one job array per stage (the work directory must be on a filesystem all nodes see)."""
    partition: Optional[str] = None  # required with executor=slurm
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "24:00:00"  # per job array task
    cpus_per_task: int = 1
    mem_per_cpu: str = "2G"
    env_command: Optional[str] = None  # run before each task; default: this interpreter's bin/ first on PATH
    wait: bool = True  # wait for the shards (false: return after submitting; rerun the command to resume)
    poll_s: float = 5.0


@dataclass
class PrepareConf:
    input: Any = None  # a path, glob or list of them (JSONL, .gz, .zst); None: the built-in sample
    output: str = "data/sample_shards"
    overwrite: bool = False
    on_error: str = "raise"  # raise | skip (bad lines are counted in the manifest)
    executor: str = "local"  # local (this machine) | slurm (a job array per stage)
    tasks: int = 0  # tasks per stage (each takes every tasks-th unit); 0: local: workers, slurm: one per unit
    workers: int = 0  # local: processes at once (and tokenizer training threads); 0: all cores
    chunk_mb: float = 64.0  # a plain JSONL file is read in chunks of this size (compressed files whole)
    bucket_mb: float = 64.0  # documents are sorted and deduplicated in buckets of about this much text
    buckets: int = 0  # the number of buckets; 0: from bucket_mb and the input's size
    max_line_bytes: int = 8 * 2**20  # a longer JSONL line is bad input (memory stays bounded)
    max_docs_per_file: int = 0  # 0: all; otherwise only the first N lines of each file
    corpus: Dict[str, SourceFormat] = field(default_factory=dict)
    clean: CleanConf = field(default_factory=CleanConf)
    dedup: DedupConf = field(default_factory=DedupConf)
    split: SplitConf = field(default_factory=SplitConf)
    tokenizer: TokenizerConf = field(default_factory=TokenizerConf)
    shards: ShardConf = field(default_factory=ShardConf)
    slurm: SlurmConf = field(default_factory=SlurmConf)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="prepare_schema", node=PrepareConf)


def validate(cfg: PrepareConf) -> None:
    """Raise ConfigError naming the first key whose value cannot work."""
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={_get(cfg, key)!r}: {why}")

    need(cfg.on_error in ("raise", "skip"), "on_error", "must be raise or skip")
    need(cfg.executor in ("local", "slurm"), "executor", "must be local or slurm")
    need(cfg.tasks >= 0, "tasks", "must be >= 0")
    need(cfg.workers >= 0, "workers", "must be >= 0")
    need(cfg.chunk_mb > 0, "chunk_mb", "must be > 0")
    need(cfg.bucket_mb > 0, "bucket_mb", "must be > 0")
    need(cfg.buckets >= 0, "buckets", "must be >= 0")
    need(cfg.executor != "slurm" or bool(cfg.slurm.partition), "slurm.partition",
         "executor=slurm needs the partition to run on (sinfo lists them)")
    need(cfg.max_line_bytes >= 1024, "max_line_bytes", "must be >= 1024")
    need(cfg.max_docs_per_file >= 0, "max_docs_per_file", "must be >= 0")
    need(bool(cfg.output), "output", "must be a directory path")
    need(len(cfg.corpus) > 0, "corpus", "no source formats: pick a corpus config (corpus=default)")
    need(cfg.clean.unicode_form in ("NFC", "NFKC", "NFD", "NFKD"), "clean.unicode_form", "NFC|NFKC|NFD|NFKD")
    need(0 <= cfg.clean.min_chars < cfg.clean.max_chars, "clean.min_chars", "must be >= 0 and < clean.max_chars")
    need(cfg.dedup.minhash_bands >= 1, "dedup.minhash_bands", "must be >= 1")
    need(cfg.dedup.minhash_rows >= 1, "dedup.minhash_rows", "must be >= 1")
    need(cfg.dedup.span_min_bytes == 0 or cfg.dedup.span_min_bytes >= 8, "dedup.span_min_bytes",
         "must be 0 (off) or >= 8")
    need(cfg.dedup.shingle_words >= 1, "dedup.shingle_words", "must be >= 1")
    need(0.0 <= cfg.split.valid_fraction < 1.0, "split.valid_fraction", "must be in [0, 1)")
    need(cfg.tokenizer.vocab_size is None or 300 <= cfg.tokenizer.vocab_size <= 2**32,
         "tokenizer.vocab_size", "must be >= 300 (bytes + special tokens) and < 2**32")
    need(0.0 < cfg.tokenizer.sample_fraction <= 1.0, "tokenizer.sample_fraction", "must be in (0, 1]")
    need(cfg.tokenizer.min_sample_docs >= 1, "tokenizer.min_sample_docs", "must be >= 1")
    need(cfg.tokenizer.threads >= 1, "tokenizer.threads", "must be >= 1")
    need(not (cfg.tokenizer.path and cfg.tokenizer.from_hf), "tokenizer.from_hf",
         f"tokenizer.path={cfg.tokenizer.path!r} is set too: use one of them")
    need(cfg.shards.seq_len >= 1, "shards.seq_len", "must be >= 1")
    need(cfg.shards.samples_per_shard >= 1, "shards.samples_per_shard", "must be >= 1")
    for name, fmt in cfg.corpus.items():
        need(len(fmt.template) > 0, f"corpus.{name}.template", "must list at least one part")
        if fmt.citation_regex:
            import re
            try:
                re.compile(fmt.citation_regex)
            except re.error as e:
                raise ConfigError(f"corpus.{name}.citation_regex: {e}") from None


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None) if not isinstance(cfg, dict) else cfg.get(part)
    return cfg
