"""gal-prepare's stages: datatrove pipeline steps over units of work that do not depend on the task count.

A stage's units are input chunks (a plain JSONL file cut every `chunk_mb`, a compressed file whole) or
document buckets (hash of the id mod `buckets`); task `rank` of `world_size` takes units[rank::world_size].
Every unit writes its own files under the work directory (written aside, then renamed), so the output
is a function of the input and the config alone, whichever executor ran how many tasks, and a task
killed half-way is simply run again (datatrove skips completed tasks).

  read      chunk   → parse, clean, render the markup → docs/<bucket>/<chunk>.jsonl, stats
  sort      bucket  → sorted/<bucket>.jsonl (by id: the document order), exact-hash records by hash,
                      datatrove MinHash signatures (rank = bucket)
  pairs     band | hash bucket → datatrove MinHash duplicate pairs per band; exact duplicates per hash
  cluster   one     → datatrove MinHash clusters → the documents to drop, per bucket
  filter    bucket  → kept/<bucket>.jsonl (exact and near duplicates dropped), span fingerprints by hash
  spans     hash bucket → which fingerprints repeat an earlier document's (pretrain/data/spans.py)
  cut       bucket  → final/<bucket>.jsonl: repeated paragraphs cut, split, probe records, tokenizer sample
  tokenizer one     → trained on the sample (or the given one) → out/tokenizer/
  tokenize  bucket  → tokens/<bucket>/<split>__<source>.npy
  pack      split/source → out/<split>/<source>/ shards + index (buckets in order)
  finish    one     → manifest.json; out/ renamed to the output
Document order, which decides which copy of a duplicate is kept, is (source priority = the order of
the corpus config, bucket, id).
"""
from __future__ import annotations

import collections
import functools
import heapq
import itertools
import json
import os
import re
import shutil
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from .config import ConfigError, PrepareConf
from .dedup import Signatures, content_hash, minhash_config
from .markup import RecordError, Renderer
from .read import BadInput, RawLine, iter_lines, lines_before
from .shards import Packer, ShardWriter, token_dtype
from .spans import cut_repeats, fingerprints_many
from .split import is_validation, unit_hash

MAX_BAD_LINES = 100  # the manifest's bad_lines: where the first skipped bad lines are
EXACT_DTYPE = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("prio", "<u2"), ("bucket", "<u4"), ("idx", "<u4")])
SPAN_DTYPE = np.dtype([("hash", "<u8"), ("prio", "<u2"), ("bucket", "<u4"), ("idx", "<u4"), ("offset", "<u4")])
COVER_DTYPE = np.dtype([("idx", "<u4"), ("offset", "<u4")])
SPLITS = ("train", "valid")


def bucket_of(doc_id: str, buckets: int) -> int:
    """A document's bucket: a hash of its id (so its place in the document order never depends on the task
    that read it)."""
    return int(unit_hash("gal-bucket", doc_id) * buckets)


@dataclass
class Plan:
    """What every stage needs to know, fixed before the first task runs (plan.json in the work directory)."""
    cfg: PrepareConf
    work: str
    output: str
    files: list[str]
    chunks: list[tuple[int, int, int | None]]  # (file index, first byte, end byte or None: to the end)
    buckets: int
    sources: list[str]  # source priority: the corpus config's order
    vocab_size: int
    builtin: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts) -> Path:
        return Path(self.work, *[str(p) for p in parts])

    def bucket_of(self, doc_id: str) -> int:
        return bucket_of(doc_id, self.buckets)

    def near(self, source: str) -> bool:
        return self.cfg.dedup.near and self.cfg.corpus[source].near_dedup

    def span(self, source: str) -> bool:
        return self.cfg.dedup.span_min_bytes > 0 and self.cfg.corpus[source].span_dedup

    def minhash(self):
        d = self.cfg.dedup
        return minhash_config(d.shingle_words, d.minhash_bands, d.minhash_rows)

    def pack_units(self) -> list[str]:
        return [f"{split}/{source}" for split in SPLITS for source in self.sources]


# ----------------------------------------------------------------------------- small file helpers
def write_atomic(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    (tmp.write_text if isinstance(data, str) else tmp.write_bytes)(data)
    os.replace(tmp, path)


def save_array(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


# Scatter / gather (the shuffle of a map-reduce): a producer unit writes ONE file of records ordered by the
# consumer unit they are for, with an index of where each consumer's part starts; a consumer reads its
# part of every producer's file. Files grow with the units, not with units squared.
def save_partitioned(path: Path, records: np.ndarray, parts: np.ndarray, count: int) -> None:
    order = np.argsort(parts, kind="stable")
    index = np.searchsorted(parts[order], np.arange(count + 1))
    save_array(path.with_suffix(".index.npy"), index.astype(np.int64))
    save_array(path.with_suffix(".npy"), records[order])


def load_partition(directory: Path, part: int, dtype: np.dtype) -> np.ndarray:
    """Consumer `part`'s records from every producer file in `directory` (producer order)."""
    pieces = []
    for index_path in sorted(directory.glob("*.index.npy")) if directory.is_dir() else []:
        index = np.load(index_path)
        if index[part + 1] > index[part]:
            data = np.load(index_path.with_name(index_path.name.replace(".index.npy", ".npy")), mmap_mode="r")
            pieces.append(np.array(data[index[part]:index[part + 1]]))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


# The work directory's document files are JSON lines written and read by orjson (several times faster than
# the json module on every stage's documents); the statistics files, read once, stay on json.
def read_jsonl(path: Path) -> Iterator[dict]:
    if path.exists():
        with open(path, "rb") as f:
            for line in f:
                yield orjson.loads(line)


class JsonlOut:
    """Lines appended to several files, each written aside and renamed into place on close."""

    def __init__(self):
        self.files: dict[Path, Any] = {}

    def write(self, path: Path, record: dict) -> int:
        f = self.files.get(path)
        if f is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self.files[path] = open(path.with_name(path.name + ".part"), "wb")
        offset = f.tell()
        f.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        return offset

    def close(self) -> None:
        for path, f in self.files.items():
            f.close()
            os.replace(f.name, path)
        self.files = {}


def counter_dict(c) -> dict:
    return {k: (counter_dict(v) if isinstance(v, dict) else v) for k, v in sorted(c.items())}


class Stage(PipelineStep):
    """A datatrove step that runs this task's share of the stage's units."""
    type = "🔬 - GALACTICA"
    imports: tuple[str, ...] = ()  # heavy modules its tasks import: the local executor imports them first,
    # so that its forked workers share one copy (and the stages before it run without them)

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan

    def units(self) -> list:
        return list(range(self.plan.buckets))

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for unit in self.units()[rank::world_size]:
            with self.track_time():
                self.do(unit)
            self.stat_update("units")
        yield from ()

    @abstractmethod
    def do(self, unit) -> None:
        """The work of one unit: read its inputs, write its outputs (atomically)."""


class OneTask(Stage):
    """A stage of one unit (it needs every bucket's results)."""

    def units(self) -> list:
        return [0]


# ----------------------------------------------------------------------------- read
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


def parse_line(raw: RawLine, renderer: Renderer, min_chars: int, max_chars: int) -> tuple:
    """("bad", reason, detail) | ("drop", source, reason) | ("doc", id, source, text, probe)."""
    if raw.problem is not None:
        return ("bad", *raw.problem)
    try:
        line = raw.data.decode("utf-8")
    except UnicodeDecodeError as e:
        return ("bad", "non_utf8", f"invalid UTF-8 byte 0x{raw.data[e.start]:02x} at byte {e.start}")
    try:
        record = orjson.loads(raw.data)
    except orjson.JSONDecodeError:  # what the json module makes of it (NaN, lone surrogates), or its error
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return ("bad", "invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
    if not isinstance(record, dict):
        return ("bad", "invalid_json", f"a JSON {type(record).__name__}, not an object")
    if "\\u" in line:  # only an escape makes a surrogate
        for key, value in record.items():
            found = _lone_surrogate(key, str(key)) or _lone_surrogate(value, str(key))
            if found:
                return ("bad", "invalid_unicode", f"{found} (invalid Unicode); fix the writer of this file")
    for key in ("id", "source"):
        if not isinstance(record.get(key), (str, int)) or record.get(key) == "":
            return ("bad", "missing_field", f"field {key!r} is missing or not a string")
    source, doc_id = str(record["source"]), str(record["id"])
    if source not in renderer.formats:
        known = ", ".join(sorted(renderer.formats))
        return ("bad", "unknown_source", f"source {source!r} has no template in the corpus config "
                f"(known: {known}); add it to conf/corpus/")
    try:
        text, probe = renderer.render_with_probe(source, record)
    except RecordError as e:
        if e.reason in ("missing_field", "empty_document", "invalid_field"):
            return ("bad", e.reason, f"document {doc_id!r}: {e}")
        return ("drop", source, e.reason)
    if not text:
        return ("bad", "empty_document", f"document {doc_id!r} is empty after cleaning")
    if len(text) < min_chars:
        return ("drop", source, "too_short")
    if len(text) > max_chars:
        return ("drop", source, "too_long")
    if source not in renderer.formula_sources:
        probe = False  # no formula expected (None: expected, but RDKit could not parse the SMILES)
    return ("doc", doc_id, source, text, probe)


class Read(Stage):
    name = "read: parse, clean, markup"

    def units(self) -> list:
        """The chunks interleaved across files (every file's first chunk, then every second one, ...), so
        that a task's share and a local pool's order mix the sources, whose cost per byte differs tenfold
        (a molecule's formula is an RDKit parse), instead of leaving the last file's chunks for the end."""
        by_file = collections.defaultdict(list)
        for chunk, (file_index, _, _) in enumerate(self.plan.chunks):
            by_file[file_index].append(chunk)
        return [c for row in itertools.zip_longest(*by_file.values()) for c in row if c is not None]

    def do(self, chunk: int) -> None:
        p, cfg = self.plan, self.plan.cfg
        file_index, start, end = p.chunks[chunk]
        path = Path(p.files[file_index])
        renderer = Renderer(dict(cfg.corpus), cfg.clean.unicode_form)
        stats = {"lines": 0, "bytes": 0, "errors": collections.Counter(), "bad_lines": [],
                 "drops": collections.defaultdict(collections.Counter)}
        by_bucket: dict[int, bytearray] = collections.defaultdict(bytearray)  # not a list of orjson's
        for raw in iter_lines(path, file_index, cfg.max_line_bytes, cfg.max_docs_per_file, start, end):
            stats["lines"] += 1
            stats["bytes"] += len(raw.data) if raw.data is not None else raw.size
            result = parse_line(raw, renderer, cfg.clean.min_chars, cfg.clean.max_chars)
            if result[0] == "bad":
                _, reason, detail = result
                if cfg.on_error == "raise":
                    raise BadInput(str(path), lines_before(path, start) + raw.line, reason, detail)
                stats["errors"][reason] += 1
                if len(stats["bad_lines"]) < MAX_BAD_LINES:
                    stats["bad_lines"].append([file_index, raw.line, reason])
            elif result[0] == "drop":
                stats["drops"][result[1]][result[2]] += 1
            else:
                _, doc_id, source, text, probe = result
                by_bucket[p.bucket_of(doc_id)] += orjson.dumps(  # (its bytes hold 4 KB whatever their length)
                    {"id": doc_id, "source": source, "chunk": chunk, "line": raw.line, "text": text, "probe": probe},
                    option=orjson.OPT_APPEND_NEWLINE)
        # one file of the chunk's documents, bucket after bucket; index: each bucket's first byte
        sizes = np.zeros(p.buckets + 1, np.int64)
        for bucket, data in by_bucket.items():
            sizes[bucket + 1] = len(data)
        write_atomic(p.path("docs", f"{chunk:06d}.jsonl"), b"".join(by_bucket[b] for b in sorted(by_bucket)))
        save_array(p.path("docs", f"{chunk:06d}.index.npy"), np.cumsum(sizes))
        stats["start"] = start
        write_atomic(p.path("stats", "read", f"{chunk:06d}.json"), json.dumps(counter_dict(stats)))


# ----------------------------------------------------------------------------- sort, signatures, exact hashes
def _minhash_groups(docs: list[dict], plan: Plan, bucket: int) -> Iterator[tuple[int, Iterator[Document]]]:
    """A bucket's documents for datatrove's MinHash steps, one stream per source priority, numbered
    (priority, bucket) so that of a duplicate pair datatrove keeps the higher-priority source's copy. Only
    near-dedup sources give their text (the others get no shingles, hence no signature, but keep their
    place in the stream's numbering)."""
    by_prio: dict[int, list[tuple[int, dict]]] = collections.defaultdict(list)
    for i, d in enumerate(docs):
        by_prio[plan.sources.index(d["source"])].append((i, d))
    for prio, members in sorted(by_prio.items()):
        yield prio * plan.buckets + bucket, (
            Document(text=d["text"] if plan.near(d["source"]) else "", id=d["id"], metadata={"idx": i})
            for i, d in members)


class Sort(Stage):
    name = "sort: document order (priority, id), exact hashes, MinHash signatures"

    def do(self, bucket: int) -> None:
        p = self.plan
        docs = []
        for c in range(len(p.chunks)):
            index = np.load(p.path("docs", f"{c:06d}.index.npy"))
            if index[bucket + 1] > index[bucket]:
                with open(p.path("docs", f"{c:06d}.jsonl"), "rb") as f:
                    f.seek(index[bucket])
                    docs += [orjson.loads(line) for line in f.read(index[bucket + 1] - index[bucket]).splitlines()]
        docs.sort(key=lambda d: (p.sources.index(d["source"]), d["id"], d["chunk"], d["line"]))
        out, sorted_path = JsonlOut(), p.path("sorted", f"{bucket:05d}.jsonl")
        for d in docs:
            out.write(sorted_path, d)
        out.close()
        if not docs:
            write_atomic(sorted_path, "")
        if p.cfg.dedup.exact:
            records = np.zeros(len(docs), EXACT_DTYPE)
            for i, d in enumerate(docs):
                digest = content_hash(d["text"])
                records[i] = (int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little"),
                              p.sources.index(d["source"]), bucket, i)
            save_partitioned(p.path("exact", f"{bucket:05d}"), records, records["h0"] % p.buckets, p.buckets)
        if p.cfg.dedup.near:
            step = Signatures(str(p.path("minhash", "signatures")), p.minhash())
            for rank, stream in _minhash_groups(docs, p, bucket):
                step.run(stream, rank=rank, world_size=len(p.sources) * p.buckets)


# ----------------------------------------------------------------------------- duplicate pairs, exact duplicates
class Pairs(Stage):
    name = "pairs: MinHash band buckets, exact duplicates"

    def units(self) -> list:
        bands = [("band", b) for b in range(self.plan.cfg.dedup.minhash_bands)] if self.plan.cfg.dedup.near else []
        exact = [("exact", e) for e in range(self.plan.buckets)] if self.plan.cfg.dedup.exact else []
        return bands + exact

    def do(self, unit) -> None:
        kind, n = unit
        p = self.plan
        if kind == "band":
            from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets
            MinhashDedupBuckets(str(p.path("minhash", "signatures")), str(p.path("minhash", "pairs")),
                                config=p.minhash()).run(rank=n, world_size=p.cfg.dedup.minhash_bands)
            return
        records = load_partition(p.path("exact"), n, EXACT_DTYPE)
        records = records[np.lexsort((records["idx"], records["bucket"], records["prio"], records["h1"], records["h0"]))]
        first = np.ones(len(records), bool)
        first[1:] = (records["h0"][1:] != records["h0"][:-1]) | (records["h1"][1:] != records["h1"][:-1])
        owner = records["prio"][np.maximum.accumulate(np.where(first, np.arange(len(records)), 0))]
        drops: dict = collections.defaultdict(collections.Counter)
        dup = records[~first]
        same = dup["prio"] == owner[~first]
        for r, s in zip(dup, same):
            drops[p.sources[r["prio"]]]["exact_duplicate_same_source" if s else "exact_duplicate_cross_source"] += 1
        save_partitioned(p.path("exact_drop", f"{n:05d}"), dup["idx"].copy(), dup["bucket"], p.buckets)
        write_atomic(p.path("stats", "exact", f"{n:05d}.json"), json.dumps({"drops": counter_dict(drops)}))


class Cluster(Stage):
    name = "cluster: MinHash clusters"

    def units(self) -> list:
        return [0] if self.plan.cfg.dedup.near else []

    def do(self, unit) -> None:
        from datatrove.pipeline.dedup.minhash import MinhashDedupCluster
        p = self.plan
        MinhashDedupCluster(str(p.path("minhash", "pairs")), str(p.path("minhash", "drop")),
                            config=p.minhash()).run(world_size=1)


# ----------------------------------------------------------------------------- filter, fingerprints
class Filter(Stage):
    name = "filter: drop duplicates, fingerprint spans"
    FINGERPRINT_BATCH = 512  # documents fingerprinted at once (a few MB of numpy arrays)

    def do(self, bucket: int) -> None:
        p = self.plan
        docs = list(read_jsonl(p.path("sorted", f"{bucket:05d}.jsonl")))
        exact = set(load_partition(p.path("exact_drop"), bucket, np.dtype("<u4")).tolist())
        near_kept = set(range(len(docs)))
        if p.cfg.dedup.near:
            from datatrove.pipeline.dedup.minhash import MinhashDedupFilter
            step = MinhashDedupFilter(str(p.path("minhash", "drop")))
            near_kept = {doc.metadata["idx"] for rank, stream in _minhash_groups(docs, p, bucket)
                         for doc in step.run(stream, rank=rank, world_size=len(p.sources) * p.buckets)}
        drops: dict = collections.defaultdict(collections.Counter)
        out, kept_path = JsonlOut(), p.path("kept", f"{bucket:05d}.jsonl")
        spans, batch = [], []

        def fingerprint(batch: list[tuple[int, dict]]) -> None:
            texts = [d["text"].encode("utf-8") for _, d in batch]
            for (idx, d), (hashes, offsets) in zip(batch, fingerprints_many(texts, p.cfg.dedup.span_min_bytes)):
                r = np.zeros(len(hashes), SPAN_DTYPE)
                r["hash"], r["offset"] = hashes, offsets
                r["prio"], r["bucket"], r["idx"] = p.sources.index(d["source"]), bucket, idx
                spans.append(r)
            batch.clear()

        for idx, d in enumerate(docs):
            if idx in exact:
                continue  # counted by the pairs stage
            if idx not in near_kept:
                drops[d["source"]]["near_duplicate"] += 1
                continue
            out.write(kept_path, {**d, "idx": idx})
            if p.span(d["source"]):
                batch.append((idx, d))
                if len(batch) >= self.FINGERPRINT_BATCH:
                    fingerprint(batch)
        fingerprint(batch)
        out.close()
        records = np.concatenate(spans) if spans else np.zeros(0, SPAN_DTYPE)
        save_partitioned(p.path("spans", f"{bucket:05d}"), records, records["hash"] % p.buckets, p.buckets)
        write_atomic(p.path("stats", "filter", f"{bucket:05d}.json"), json.dumps({"drops": counter_dict(drops)}))


class Spans(Stage):
    name = "spans: repeated fingerprints"

    def units(self) -> list:
        return list(range(self.plan.buckets)) if self.plan.cfg.dedup.span_min_bytes > 0 else []

    def do(self, s: int) -> None:
        p = self.plan
        r = load_partition(p.path("spans"), s, SPAN_DTYPE)
        r = r[np.lexsort((r["offset"], r["idx"], r["bucket"], r["prio"], r["hash"]))]
        repeat = np.zeros(len(r), bool)
        repeat[1:] = r["hash"][1:] == r["hash"][:-1]  # not the first (in document order) with this hash
        r = r[repeat]
        cover = np.zeros(len(r), COVER_DTYPE)
        cover["idx"], cover["offset"] = r["idx"], r["offset"]
        save_partitioned(p.path("span_repeats", f"{s:05d}"), cover, r["bucket"], p.buckets)


# ----------------------------------------------------------------------------- cut, split, sample
class Cut(Stage):
    name = "cut: repeated paragraphs, split, probes, tokenizer sample"

    def do(self, bucket: int) -> None:
        p, cfg = self.plan, self.plan.cfg
        repeats = load_partition(p.path("span_repeats"), bucket, COVER_DTYPE)
        by_doc: dict[int, list[int]] = collections.defaultdict(list)
        for idx, offset in zip(repeats["idx"].tolist(), repeats["offset"].tolist()):
            by_doc[idx].append(offset)
        counts: dict = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
        drops: dict = collections.defaultdict(collections.Counter)
        span_bytes: collections.Counter = collections.Counter()
        probes: collections.Counter = collections.Counter()
        sample, smallest = [], []  # (hash, offset): the tokenizer sample and the fallback (a max-heap)
        salt = f"tokenizer-sample-{cfg.tokenizer.seed}"
        out = JsonlOut()
        final, probes_path = p.path("final", f"{bucket:05d}.jsonl"), p.path("probes", f"{bucket:05d}.jsonl")
        for d in read_jsonl(p.path("kept", f"{bucket:05d}.jsonl")):
            text, source = d["text"], d["source"]
            if d["idx"] in by_doc:
                text, removed = cut_repeats(text, np.array(sorted(by_doc[d["idx"]]), np.uint32),
                                            cfg.dedup.span_min_bytes)
                span_bytes[source] += removed
                if len(text) < cfg.clean.min_chars:
                    drops[source]["span_duplicate"] += 1
                    continue
            split = "valid" if is_validation(d["id"], cfg.split.valid_fraction, cfg.split.salt) else "train"
            offset = out.write(final, {"id": d["id"], "source": source, "split": split, "text": text})
            c = counts[source][split]
            c["documents"] += 1
            c["chars"] += len(text)
            probe = d["probe"]
            if probe is not False:  # a source with a formula: count the documents without one
                c["no_formula"] += probe is None
            if probe and split == "valid":
                out.write(probes_path, {"source": source, "id": d["id"], **probe})
                probes[source] += 1
            if split == "train":
                u = unit_hash(salt, d["id"])
                if u < cfg.tokenizer.sample_fraction:
                    sample.append((u, offset))
                elif len(smallest) < cfg.tokenizer.min_sample_docs:
                    heapq.heappush(smallest, (-u, offset))
                elif -smallest[0][0] > u:
                    heapq.heapreplace(smallest, (-u, offset))
        out.close()
        if not final.exists():
            write_atomic(final, "")
        stats = {"counts": counter_dict(counts), "drops": counter_dict(drops), "span_bytes_removed": dict(span_bytes),
                 "probes": dict(probes), "sample": sorted(sample), "smallest": sorted((-u, o) for u, o in smallest)}
        write_atomic(p.path("stats", "cut", f"{bucket:05d}.json"), json.dumps(stats))


# ----------------------------------------------------------------------------- the statistics of every unit
def gather(plan: Plan) -> dict[str, Any]:
    """Every unit's statistics, added up (the read stage's, and those of the stages that ran so far)."""
    files = plan.files
    g: dict[str, Any] = {"lines": 0, "bytes": 0, "errors": collections.Counter(),
                         "errors_by_file": collections.defaultdict(collections.Counter), "bad_lines": [],
                         "drops_by_source": collections.defaultdict(collections.Counter),
                         "counts": collections.defaultdict(lambda: {s: collections.Counter() for s in SPLITS}),
                         "span_bytes_removed": collections.Counter(), "probes": collections.Counter()}
    for c, (file_index, start, _) in enumerate(plan.chunks):
        st = json.loads(plan.path("stats", "read", f"{c:06d}.json").read_text())
        g["lines"] += st["lines"]
        g["bytes"] += st["bytes"]
        before = lines_before(Path(files[file_index]), start) if st["bad_lines"] and start else 0
        g["bad_lines"] += [(fi, before + line, reason) for fi, line, reason in st["bad_lines"]]
        for source, drops in st["drops"].items():
            g["drops_by_source"][source].update(drops)
        g["errors"].update(st["errors"])
        if st["errors"]:
            g["errors_by_file"][files[file_index]].update(st["errors"])
    for kind in ("exact", "filter", "cut"):
        for path in sorted(plan.path("stats", kind).glob("*.json")) if plan.path("stats", kind).is_dir() else []:
            st = json.loads(path.read_text())
            for source, drops in st["drops"].items():
                g["drops_by_source"][source].update(drops)
            for source, by_split in st.get("counts", {}).items():
                for split, c in by_split.items():
                    g["counts"][source][split].update(c)
            g["span_bytes_removed"].update(st.get("span_bytes_removed", {}))
            g["probes"].update(st.get("probes", {}))
    g["bad_lines"] = [{"file": files[fi], "line": line, "reason": reason}
                      for fi, line, reason in sorted(g["bad_lines"])[:MAX_BAD_LINES]]
    g["drops"] = sum(g["drops_by_source"].values(), collections.Counter())
    return g


def require_training_documents(plan: Plan, g: dict[str, Any]) -> None:
    """ConfigError when the input left no training document (empty, or every line bad or dropped)."""
    if any(c["train"]["documents"] for c in g["counts"].values()):
        return
    files = plan.files
    kept = sum(c["valid"]["documents"] for c in g["counts"].values())
    errors = ", ".join(f"{k} {v:,}" for k, v in sorted(g["errors"].items())) or "none"
    drops = ", ".join(f"{k} {v:,}" for k, v in sorted(g["drops"].items())) or "none"
    raise ConfigError(f"input: no training documents left from {len(files)} file(s) ({files[0]}"
                      f"{', ...' if len(files) > 1 else ''}): {g['lines']:,} lines read, {kept:,} held out for "
                      f"validation; bad lines skipped: {errors}; dropped: {drops}; check that input= names the "
                      "right, non-empty JSONL files (and clean.min_chars, clean.max_chars, split.valid_fraction)")


# ----------------------------------------------------------------------------- tokenizer
def given_tokenizer(cfg: PrepareConf):
    """tokenizer.from_hf's or tokenizer.path's tokenizer, or None when one is to be trained."""
    from pretrain.tokenizer import GalacticaTokenizer, HFTokenizer
    if cfg.tokenizer.from_hf:
        try:
            return HFTokenizer.load(cfg.tokenizer.from_hf)
        except ConfigError as e:
            raise ConfigError(f"tokenizer.from_hf: {e}") from None
    if cfg.tokenizer.path:
        return GalacticaTokenizer.load(cfg.tokenizer.path)
    return None


def tokenizer_sample(plan: Plan) -> list[tuple[int, int]]:
    """(bucket, byte offset in final/<bucket>.jsonl) of the tokenizer's training documents: those whose
    hash is below sample_fraction, topped up with the smallest hashes to min_sample_docs."""
    chosen, fallback = [], []
    for b in range(plan.buckets):
        stats = json.loads(plan.path("stats", "cut", f"{b:05d}.json").read_text())
        chosen += [(u, b, o) for u, o in stats["sample"]]
        fallback += [(u, b, o) for u, o in stats["smallest"]]
    need = max(0, plan.cfg.tokenizer.min_sample_docs - len(chosen))
    chosen += sorted(fallback)[:need]
    return sorted((b, o) for _, b, o in chosen)


class Tokenizer(OneTask):
    name = "tokenizer: train on the sample"

    def do(self, unit) -> None:
        from pretrain.tokenizer import GalacticaTokenizer
        p = self.plan
        require_training_documents(p, gather(p))
        out = p.path("out", "tokenizer")
        shutil.rmtree(out, ignore_errors=True)
        tok = given_tokenizer(p.cfg)
        sample = tokenizer_sample(p)
        if tok is not None:
            tok.save(out)
        else:
            if not sample:
                raise ValueError("no training documents left to train the tokenizer on (all dropped or held out?)")

            def texts() -> Iterator[str]:
                for b, offset in sample:
                    with open(p.path("final", f"{b:05d}.jsonl"), "rb") as f:
                        f.seek(offset)
                        yield orjson.loads(f.readline())["text"]

            tok = GalacticaTokenizer.train(texts(), out, vocab_size=p.vocab_size, seed=p.cfg.tokenizer.seed,
                                           num_threads=p.cfg.tokenizer.threads, progress=False)
        if tok.kind == "sentencepiece":
            tok.export_hf(out / "hf")
        info = {"kind": tok.kind, "sha256": tok.sha256, "file": tok.file_name, "vocab_size": tok.vocab_size,
                "special_ids": tok.special_ids, "pad_id": tok.pad_id, "eos_id": tok.eos_id,
                "trained_on_documents": 0 if p.cfg.tokenizer.from_hf or p.cfg.tokenizer.path else len(sample)}
        write_atomic(p.path("stats", "tokenizer.json"), json.dumps(info))


def tokenizer_info(plan: Plan) -> dict:
    return json.loads(plan.path("stats", "tokenizer.json").read_text())


# ----------------------------------------------------------------------------- tokenize, pack
@functools.lru_cache(maxsize=1)
def _loaded_tokenizer(path: str):
    """One tokenizer per process: its word cache stays warm from one unit to the next (a local worker
    runs many tasks)."""
    from pretrain.tokenizer import load_tokenizer
    return load_tokenizer(path)


class Tokenize(Stage):
    name = "tokenize"
    BATCH = 128

    def do(self, bucket: int) -> None:
        p = self.plan
        info = tokenizer_info(p)
        tok = _loaded_tokenizer(str(p.path("out", "tokenizer", info["file"])))
        dtype = token_dtype(info["vocab_size"])
        groups: dict[str, tuple[list, list]] = collections.defaultdict(lambda: ([], []))
        docs = list(read_jsonl(p.path("final", f"{bucket:05d}.jsonl")))
        for i in range(0, len(docs), self.BATCH):
            batch = docs[i:i + self.BATCH]
            for d, ids in zip(batch, tok.encode_batch([d["text"] for d in batch])):
                arrays, ids_lens = groups[f"{d['split']}__{d['source']}"]
                arrays.append(np.array(ids + [tok.eos_id], dtype))
                ids_lens.append((d["id"], len(ids) + 1))
        target = p.path("tokens", f"{bucket:05d}")
        shutil.rmtree(target, ignore_errors=True)
        for name, (arrays, ids_lens) in groups.items():
            save_array(target / f"{name}.npy", np.concatenate(arrays))
            write_atomic(target / f"{name}.json", json.dumps(ids_lens))


class Pack(Stage):
    name = "pack: shards and index"
    imports = ("webdataset",)  # and with it torch: 1 s and 220 MB that no other stage needs

    def units(self) -> list:
        return self.plan.pack_units()

    def do(self, unit: str) -> None:
        p = self.plan
        split, source = unit.split("/")
        info = tokenizer_info(p)
        out = p.path("out", split, source)
        shutil.rmtree(out, ignore_errors=True)
        packer = None
        tokens = 0
        for b in range(p.buckets):
            base = p.path("tokens", f"{b:05d}", f"{split}__{source}")
            if not base.with_suffix(".json").exists():
                continue
            if packer is None:
                writer = ShardWriter(out, p.cfg.shards.seq_len + 1, token_dtype(info["vocab_size"]),
                                     p.cfg.shards.samples_per_shard)
                packer = Packer(writer, info["pad_id"])
            array = np.load(base.with_suffix(".npy"))
            start = 0
            for doc_id, n in json.loads(base.with_suffix(".json").read_text()):
                packer.add(doc_id, source, array[start:start + n])
                start += n
            tokens += start
        result = {**packer.finish(), "tokens": tokens} if packer is not None else None
        write_atomic(p.path("stats", "pack", f"{split}__{source}.json"), json.dumps(result))
