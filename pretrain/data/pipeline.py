"""gal-prepare's pipeline: JSONL → clean → dedup → split → markup → tokenizer → packed shards.

Two streaming passes with bounded memory (except the dedup tables, see dedup.py):
  1. read lines → (workers) parse, clean, render the Galactica markup, hash, MinHash → (main, in
     input order) dedup, split, append to a work file of kept documents; pick the tokenizer sample;
     write the held-out records of sources with a formula to probes/<source>.jsonl (the chemistry
     probe's prompts and gold formulas, pretrain/evaluation/probes.py).
  2. train the tokenizer on the sample (or take tokenizer.path / tokenizer.from_hf as it is); read the
     work file → (workers) tokenize → (main) pack into samples of seq_len + 1 tokens → shards + index
     per split and source (train/<source>/, valid/<source>/), so a run can mix the sources
     (pretrain/data/loader.py).
The tokenizer goes into OUTPUT/tokenizer/ (its file, named in the manifest, and an AutoTokenizer folder),
so the shards describe themselves: `pretrain.tokenizer.load_tokenizer(OUTPUT/manifest["tokenizer"]["model"])`.
Everything is written into a temporary directory beside the output, renamed into place at the end,
so an interrupted run never leaves a manifest that claims incomplete shards. Workers run in order
(a bounded window of batches in flight), so the output is a deterministic function of the input and
the config, whatever the number of workers.
"""
from __future__ import annotations

import collections
import heapq
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from .config import PAPER_VOCAB_SIZE, SAMPLE_VOCAB_SIZE, ConfigError, PrepareConf, SourceFormat, validate
from .dedup import Deduplicator, Signer, content_hash
from .markup import RecordError, Renderer
from .read import BadInput, RawLine, expand_inputs, iter_lines
from .shards import Packer, ShardWriter, token_dtype
from .split import is_validation, unit_hash

SAMPLE_DIR = Path(__file__).parent / "sample"
FORMAT_VERSION = "galactica-shards-v2"  # v2: train/<source>/ (v1: one train/ for all sources)
LINES_PER_BATCH = 256
DOCS_PER_BATCH = 128
MAX_BAD_LINES = 100  # the manifest's bad_lines: where the first skipped bad lines are


def builtin_sample_files() -> list[Path]:
    return sorted(SAMPLE_DIR.glob("*.jsonl.gz"))


# ----------------------------------------------------------------------------- worker side
_W: dict[str, Any] = {}


def _init_clean(formats: dict[str, SourceFormat], unicode_form: str, min_chars: int, max_chars: int,
                num_perm: int, shingle_words: int, near: bool) -> None:
    _W["renderer"] = Renderer(formats, unicode_form)
    _W["signer"] = Signer(num_perm, shingle_words) if near else None
    _W["limits"] = (min_chars, max_chars)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any, field: str) -> str | None:
    """Where a lone UTF-16 surrogate (a JSON escape such as \\ud800 without its pair) is in a parsed value,
    or None: such a string cannot be written as UTF-8."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return f"lone surrogate U+{ord(m.group()):04X} at character {m.start()} of field {field!r}" if m else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key, field) or _lone_surrogate(item, field)
        if found:
            return found
    return None


def _clean_one(raw: RawLine) -> tuple:
    if raw.problem is not None:
        return ("bad", raw.file_index, raw.line, *raw.problem)
    try:
        line = raw.data.decode("utf-8")
    except UnicodeDecodeError as e:
        return ("bad", raw.file_index, raw.line, "non_utf8", f"invalid UTF-8 byte 0x{raw.data[e.start]:02x} at byte {e.start}")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return ("bad", raw.file_index, raw.line, "invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
    if not isinstance(record, dict):
        return ("bad", raw.file_index, raw.line, "invalid_json", f"a JSON {type(record).__name__}, not an object")
    if "\\u" in line:  # only an escape makes a surrogate
        for key, value in record.items():
            found = _lone_surrogate(key, str(key)) or _lone_surrogate(value, str(key))
            if found:
                return ("bad", raw.file_index, raw.line, "invalid_unicode", f"{found} (invalid Unicode); fix the "
                        "writer of this file")
    for key in ("id", "source"):
        if not isinstance(record.get(key), (str, int)) or record.get(key) == "":
            return ("bad", raw.file_index, raw.line, "missing_field", f"field {key!r} is missing or not a string")
    renderer: Renderer = _W["renderer"]
    source, doc_id = str(record["source"]), str(record["id"])
    fmt = renderer.formats.get(source)
    if fmt is None:
        known = ", ".join(sorted(renderer.formats))
        return ("bad", raw.file_index, raw.line, "unknown_source", f"source {source!r} has no template in the corpus config "
                f"(known: {known}); add it to conf/corpus/")
    try:
        text, probe = renderer.render_with_probe(source, record)
    except RecordError as e:
        if e.reason in ("missing_field", "empty_document", "invalid_field"):
            return ("bad", raw.file_index, raw.line, e.reason, f"document {doc_id!r}: {e}")
        return ("drop", source, e.reason)
    if not text:
        return ("bad", raw.file_index, raw.line, "empty_document", f"document {doc_id!r} is empty after cleaning")
    min_chars, max_chars = _W["limits"]
    if len(text) < min_chars:
        return ("drop", source, "too_short")
    if len(text) > max_chars:
        return ("drop", source, "too_long")
    signer: Signer | None = _W["signer"]
    signature = signer.signature(text) if signer is not None and fmt.near_dedup else None
    if source not in renderer.formula_sources:
        probe = False  # no formula expected (None: expected, but RDKit could not parse the SMILES)
    return ("doc", doc_id, source, text, content_hash(text), signature, probe)


def _clean_batch(batch: list[RawLine]) -> list[tuple]:
    return [_clean_one(raw) for raw in batch]


def _init_tokenize(tokenizer_file: str, dtype: str) -> None:
    from pretrain.tokenizer import load_tokenizer
    _W["tokenizer"] = load_tokenizer(tokenizer_file)
    _W["dtype"] = np.dtype(dtype)


def _tokenize_batch(texts: list[str]) -> list[np.ndarray]:
    tok, dtype = _W["tokenizer"], _W["dtype"]
    return [np.array(ids + [tok.eos_id], dtype) for ids in tok.encode_batch(texts)]


def ordered_map(pool, fn: Callable, items: Iterable, window: int) -> Iterator:
    """pool.imap without its unbounded read-ahead: at most `window` batches in flight, in order."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _batched(it: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- main side
class Stats:
    def __init__(self):
        self.errors: collections.Counter = collections.Counter()
        self.drops: collections.Counter = collections.Counter()
        self.drops_by_source: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.counts: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
            lambda: {"train": collections.Counter(), "valid": collections.Counter()})
        self.errors_by_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.bad_lines: list[dict] = []  # the first MAX_BAD_LINES skipped bad lines: file, line, reason
        self.lines = 0
        self.input_bytes = 0
        self.probes: collections.Counter = collections.Counter()  # probe records written per source


def _pool(workers: int, initializer, initargs):
    if workers <= 1:
        initializer(*initargs)
        return None
    return multiprocessing.get_context("fork").Pool(workers, initializer, initargs)


def _offer_to_sample(u: float, offset: int, sample: list[int], smallest: list, tcfg) -> None:
    """The tokenizer sample: every training document whose hash ``u`` is below sample_fraction, and the
    min_sample_docs smallest hashes (a max-heap of negated hashes) to fall back on in a small corpus."""
    if u < tcfg.sample_fraction:
        sample.append(offset)
    elif len(smallest) < tcfg.min_sample_docs:
        heapq.heappush(smallest, (-u, offset))
    elif -smallest[0][0] > u:
        heapq.heapreplace(smallest, (-u, offset))


def _pass1(cfg: PrepareConf, files: list[Path], work: Path, workers: int, stats: Stats, progress: bool) -> list[int]:
    """Clean, dedup and split into the work file, held-out probe records into work/../probes/;
    return the byte offsets of the tokenizer sample."""
    dedup = Deduplicator(cfg.dedup.exact, cfg.dedup.near, cfg.dedup.threshold, cfg.dedup.num_perm)
    tcfg = cfg.tokenizer
    sample: list[int] = []  # offsets of training documents in the hash sample
    smallest: list[tuple[float, int]] = []  # max-heap (negated) of the min_sample_docs smallest hashes
    total_bytes = sum(f.stat().st_size for f in files) if all(f.suffix == ".jsonl" for f in files) else None

    def lines() -> Iterator[RawLine]:
        for i, path in enumerate(files):
            yield from iter_lines(path, i, cfg.max_line_bytes, cfg.max_docs_per_file)

    def batches() -> Iterator[list[RawLine]]:
        for batch in _batched(lines(), LINES_PER_BATCH):
            yield batch
            nbytes = sum(len(r.data) if r.data is not None else r.size for r in batch)
            stats.lines += len(batch)
            stats.input_bytes += nbytes
            bar.update(nbytes)

    initargs = (dict(cfg.corpus), cfg.clean.unicode_form, cfg.clean.min_chars, cfg.clean.max_chars,
                cfg.dedup.num_perm, cfg.dedup.shingle_words, cfg.dedup.near)
    pool = _pool(workers, _init_clean, initargs)
    bar = tqdm(total=total_bytes, desc="clean+dedup", unit="B", unit_scale=True, disable=not progress)
    probe_files: dict[str, Any] = {}
    try:
        with open(work, "wb") as out:
            for results in ordered_map(pool, _clean_batch, batches(), 4 * max(workers, 1)):
                for result in results:
                    kind = result[0]
                    if kind == "bad":
                        _, file_index, line, reason, detail = result
                        if cfg.on_error == "raise":
                            raise BadInput(str(files[file_index]), line, reason, detail)
                        stats.errors[reason] += 1
                        stats.errors_by_file[str(files[file_index])][reason] += 1
                        if len(stats.bad_lines) < MAX_BAD_LINES:
                            stats.bad_lines.append({"file": str(files[file_index]), "line": line, "reason": reason})
                        continue
                    if kind == "drop":
                        _, source, reason = result
                        stats.drops[reason] += 1
                        stats.drops_by_source[source][reason] += 1
                        continue
                    _, doc_id, source, text, digest, signature, probe = result
                    duplicate = dedup.check(source, digest, signature)
                    if duplicate:
                        stats.drops[duplicate] += 1
                        stats.drops_by_source[source][duplicate] += 1
                        continue
                    split = "valid" if is_validation(doc_id, cfg.split.valid_fraction, cfg.split.salt) else "train"
                    offset = out.tell()
                    out.write(json.dumps({"id": doc_id, "source": source, "split": split, "text": text},
                                         ensure_ascii=False).encode("utf-8") + b"\n")
                    c = stats.counts[source][split]
                    c["documents"] += 1
                    c["chars"] += len(text)
                    if probe is not False:  # a source with a formula: count the documents without one
                        c["no_formula"] += probe is None
                    if probe and split == "valid":
                        if source not in probe_files:
                            (work.parent.parent / "probes").mkdir(exist_ok=True)
                            probe_files[source] = open(work.parent.parent / "probes" / f"{source}.jsonl", "w")
                        probe_files[source].write(json.dumps({"id": doc_id, **probe}, ensure_ascii=False) + "\n")
                        stats.probes[source] += 1
                    if split == "train":
                        _offer_to_sample(unit_hash(f"tokenizer-sample-{tcfg.seed}", doc_id), offset, sample,
                                         smallest, tcfg)
    finally:
        bar.close()
        for f in probe_files.values():
            f.close()
        if pool is not None:
            pool.terminate()
    need_more = max(0, tcfg.min_sample_docs - len(sample))
    extra = sorted(smallest, reverse=True)[:need_more]  # the smallest hashes not already sampled
    return sorted(sample + [offset for _, offset in extra])



def _read_work(work: Path, offsets: list[int] | None = None) -> Iterator[dict]:
    """The kept documents in order; with `offsets` (sorted), only those."""
    with open(work, "rb") as f:
        if offsets is None:
            for line in f:
                yield json.loads(line)
            return
        for offset in offsets:
            f.seek(offset)
            yield json.loads(f.readline())


def _given_tokenizer(cfg: PrepareConf):
    """tokenizer.from_hf's or tokenizer.path's tokenizer, loaded before any work so that a bad one fails
    first; None when one is to be trained."""
    from pretrain.tokenizer import GalacticaTokenizer, HFTokenizer
    if cfg.tokenizer.from_hf:
        try:
            return HFTokenizer.load(cfg.tokenizer.from_hf)
        except ConfigError as e:
            raise ConfigError(f"tokenizer.from_hf: {e}") from None
    if cfg.tokenizer.path:
        return GalacticaTokenizer.load(cfg.tokenizer.path)
    return None


def _tokenizer(cfg: PrepareConf, given, work: Path, sample: list[int], out_dir: Path, vocab_size: int,
               workers: int, progress: bool):
    """The shard set's tokenizer written into out_dir: the given one (tokenizer.from_hf's tokenizer.json is
    its own AutoTokenizer folder), or our sentencepiece model trained on the sample; ours gets its Hugging
    Face export in out_dir/hf."""
    from pretrain.tokenizer import GalacticaTokenizer
    if given is not None:
        tok = given
        tok.save(out_dir)
    else:
        if not sample:
            raise ValueError("no training documents left to train the tokenizer on (all dropped or held out?)")
        texts = (d["text"] for d in _read_work(work, sample))
        if progress:
            print(f"training the tokenizer (vocab {vocab_size:,}) on {len(sample):,} documents ...", file=sys.stderr)
        tok = GalacticaTokenizer.train(texts, out_dir, vocab_size=vocab_size, seed=cfg.tokenizer.seed,
                                       num_threads=max(workers, 1), progress=False)
    if tok.kind == "sentencepiece":
        tok.export_hf(out_dir / "hf")
    return tok


def _pass2(cfg: PrepareConf, work: Path, out: Path, tokenizer_file: Path, vocab_size: int, workers: int,
           stats: Stats, pad_id: int, progress: bool) -> dict[str, dict]:
    """Tokenize the kept documents and pack them into train/<source>/ and valid/<source>/ shards."""
    dtype = token_dtype(vocab_size)
    sample_len = cfg.shards.seq_len + 1
    packers: dict[str, Packer] = {}

    def packer(name: str) -> Packer:
        if name not in packers:
            packers[name] = Packer(ShardWriter(out / name, sample_len, dtype, cfg.shards.samples_per_shard), pad_id)
        return packers[name]

    total = sum(c["documents"] for s in stats.counts.values() for c in s.values())
    pool = _pool(workers, _init_tokenize, (str(tokenizer_file), dtype.name))
    bar = tqdm(total=total, desc="tokenize+pack", unit=" docs", disable=not progress)
    try:
        batches = _batched(_read_work(work), DOCS_PER_BATCH)
        pending: collections.deque = collections.deque()

        def texts() -> Iterator[list[str]]:
            for batch in batches:
                pending.append(batch)
                yield [d["text"] for d in batch]

        for token_arrays in ordered_map(pool, _tokenize_batch, texts(), 4 * max(workers, 1)):
            docs = pending.popleft()
            for doc, tokens in zip(docs, token_arrays):
                split, source = doc["split"], doc["source"]
                packer(f"{split}/{source}").add(doc["id"], source, tokens)
                stats.counts[source][split]["tokens"] += len(tokens)
            bar.update(len(docs))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return {name: p.finish() for name, p in sorted(packers.items())}


def _check_writable(out: Path) -> None:
    """The output's parent must be a directory this process can write (it is created when missing)."""

    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output={out}: {parent} is a file, not a directory; choose another output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output={out}: {parent} is not writable by this user; choose another output")


def prepare(cfg: PrepareConf, progress: bool = True) -> dict[str, Any]:
    """Run the whole pipeline; returns the manifest (also written to OUTPUT/manifest.json)."""
    validate(cfg)
    out = Path(cfg.output).expanduser().resolve()
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output={out} already exists: pass overwrite=true to replace it")
    if out.exists() and not (out / "manifest.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output={out} is not a gal-prepare shard set (no manifest.json): overwrite=true "
                              "replaces shard sets only; choose another output or remove it yourself")
    _check_writable(out)
    builtin = cfg.input is None
    files = builtin_sample_files() if builtin else expand_inputs(cfg.input)
    if not files:
        raise FileNotFoundError(f"input=null but the built-in sample is missing from {SAMPLE_DIR} "
                                "(run python -m pretrain.data.make_sample)")
    vocab_size = cfg.tokenizer.vocab_size or (SAMPLE_VOCAB_SIZE if builtin else PAPER_VOCAB_SIZE)
    given = _given_tokenizer(cfg)
    workers = cfg.workers or os.cpu_count() or 1
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove_stale_temporaries(out)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "work").mkdir(parents=True)
    stats = Stats()
    timing: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        work = tmp / "work" / "documents.jsonl"
        sample = _pass1(cfg, files, work, workers, stats, progress)
        _require_training_documents(files, stats)
        timing["clean_dedup_split_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        tok = _tokenizer(cfg, given, work, sample, tmp / "tokenizer", vocab_size, workers, progress)
        timing["tokenizer_train_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        splits = _pass2(cfg, work, tmp, tmp / "tokenizer" / tok.file_name, tok.vocab_size, workers,
                        stats, tok.pad_id, progress)
        timing["tokenize_pack_s"] = time.perf_counter() - t2
        timing["total_s"] = time.perf_counter() - t0
        timing["input_mb_per_s"] = stats.input_bytes / 1e6 / timing["total_s"]
        shutil.rmtree(tmp / "work")
        manifest = _manifest(cfg, files, stats, splits, tok, sample, timing, workers)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        if out.exists():  # overwrite=true: swap, then delete the old one
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["output"] = str(out)
    return manifest


def _require_training_documents(files: list[Path], stats: Stats) -> None:
    """ConfigError when the input left no training document (empty, or every line bad or dropped)."""
    if any(c["train"]["documents"] for c in stats.counts.values()):
        return
    kept = sum(c["valid"]["documents"] for c in stats.counts.values())
    errors = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.errors.items())) or "none"
    drops = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.drops.items())) or "none"
    raise ConfigError(f"input: no training documents left from {len(files)} file(s) ({files[0]}"
                      f"{', ...' if len(files) > 1 else ''}): {stats.lines:,} lines read, {kept:,} held out for "
                      f"validation; bad lines skipped: {errors}; dropped: {drops}; check that input= names the "
                      "right, non-empty JSONL files (and clean.min_chars, clean.max_chars, split.valid_fraction)")


def _remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary directories of killed runs (their process no longer exists)."""
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            os.kill(int(path.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _manifest(cfg, files, stats: Stats, splits, tok, sample, timing, workers) -> dict[str, Any]:
    from omegaconf import OmegaConf
    sources = {s: {split: dict(c) for split, c in v.items()} for s, v in sorted(stats.counts.items())}
    dedup_reasons = [r for r in stats.drops if "duplicate" in r]
    given = cfg.tokenizer.from_hf or cfg.tokenizer.path
    return {
        "format": FORMAT_VERSION,
        "seq_len": cfg.shards.seq_len,
        "sample_len": cfg.shards.seq_len + 1,
        "dtype": next(iter(splits.values()))["dtype"],
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id,
        "eos_id": tok.eos_id,
        # the tokenizer: kind "sentencepiece" (ours) or "hf" (tokenizer.from_hf); "model" its file (the bytes
        # sha256 hashes; pretrain.tokenizer.load_tokenizer reads either), "hf" an AutoTokenizer folder
        "tokenizer": {"kind": tok.kind, "sha256": tok.sha256, "model": f"tokenizer/{tok.file_name}",
                      "hf": "tokenizer/hf" if tok.kind == "sentencepiece" else "tokenizer",
                      "vocab_size": tok.vocab_size, "special_ids": tok.special_ids,
                      "trained_on_documents": 0 if given else len(sample),
                      "from": given or "trained"},
        "inputs": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
        "input": {"lines": stats.lines, "bytes": stats.input_bytes},
        "sources": sources,
        "splits": {name: {"dir": name, "samples": s["num_samples"], "pad_tokens": s["pad_tokens"],
                          "tokens": s["num_samples"] * s["sample_len"] - s["pad_tokens"],
                          "shards": s["shards"]} for name, s in splits.items()},
        "totals": {split: {k: sum(v[split][k] for v in stats.counts.values()) for k in ("documents", "tokens", "chars")}
                   for split in ("train", "valid")},
        "errors": dict(sorted(stats.errors.items())),
        "errors_by_file": {f: dict(sorted(c.items())) for f, c in stats.errors_by_file.items()},
        "bad_lines": stats.bad_lines,
        "drops": dict(sorted(stats.drops.items())),
        "drops_by_source": {s: dict(sorted(c.items())) for s, c in sorted(stats.drops_by_source.items())},
        "dedup": {r: stats.drops[r] for r in sorted(dedup_reasons)},
        # held-out records of sources with a formula: prompt, SMILES and gold formula (pretrain/evaluation/probes.py)
        "probes": {s: {"path": f"probes/{s}.jsonl", "records": n} for s, n in sorted(stats.probes.items())},
        "timing": {k: round(v, 3) for k, v in timing.items()},
        "workers": workers,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }


def summary_table(manifest: dict[str, Any]):
    """A rich table: documents and tokens per source and split, drops, samples, speed."""
    from rich.table import Table
    table = Table(title=f"gal-prepare → {manifest.get('output', '')}")
    for col in ("source", "train docs", "valid docs", "train tokens", "valid tokens", "dropped"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for source, c in manifest["sources"].items():
        dropped = sum(manifest["drops_by_source"].get(source, {}).values())
        table.add_row(source, f"{c['train'].get('documents', 0):,}", f"{c['valid'].get('documents', 0):,}",
                      f"{c['train'].get('tokens', 0):,}", f"{c['valid'].get('tokens', 0):,}", f"{dropped:,}")
    t = manifest["totals"]
    table.add_row("[bold]total", f"{t['train']['documents']:,}", f"{t['valid']['documents']:,}",
                  f"{t['train']['tokens']:,}", f"{t['valid']['tokens']:,}",
                  f"{sum(manifest['drops'].values()):,}", end_section=True)
    splits = ", ".join(f"{name}: {s['samples']:,} samples in {len(s['shards'])} shards"
                       for name, s in manifest["splits"].items())
    drops = ", ".join(f"{k} {v:,}" for k, v in manifest["drops"].items()) or "none"
    errors = ", ".join(f"{k} {v:,}" for k, v in manifest["errors"].items()) or "none"
    tm = manifest["timing"]
    table.caption = (f"{splits}\ndrops: {drops}; skipped bad lines: {errors}\n"
                     f"vocab {manifest['vocab_size']:,} ({manifest['dtype']}), seq_len {manifest['seq_len']}, "
                     f"{manifest['input']['bytes'] / 1e6:.1f} MB in {tm['total_s']:.1f} s = {tm['input_mb_per_s']:.2f} MB/s")
    return table
