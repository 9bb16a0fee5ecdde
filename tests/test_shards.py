"""Shards: exact token accounting, no validation leak, index reads == sequential webdataset reads."""
from __future__ import annotations

import hashlib
import json
import multiprocessing

import numpy as np
import pytest
import yaml

from helpers import REPO, run_cli, subset

from pretrain.data.config import SourceFormat
from pretrain.data.markup import Renderer
from pretrain.data.shards import Packer, ShardReader, ShardWriter, token_dtype
from pretrain.data.split import is_validation
from pretrain.data.stages import bucket_of
from pretrain.tokenizer import GalacticaTokenizer

LINES_PER_FILE = 150
SEQ_LEN = 255


@pytest.fixture(scope="module")
def prepared(shared_corpus, tmp_path_factory):
    """The first lines of every shared-corpus file, through the real CLI."""
    tmp = tmp_path_factory.mktemp("shared")
    inputs = tmp / "in"
    inputs.mkdir()
    for f in sorted(shared_corpus.glob("*.jsonl")):
        subset(f, inputs / f.name, LINES_PER_FILE)
    out = tmp / "shards"
    run_cli(f"input={inputs}/*.jsonl", f"output={out}", "tokenizer.vocab_size=1200", f"shards.seq_len={SEQ_LEN}",
            "shards.samples_per_shard=40", "split.valid_fraction=0.1",
            "dedup.span_min_bytes=0")  # each document's tokens are its rendering's (span dedup is in test_prepare_scale)
    return inputs, out, json.loads((out / "manifest.json").read_text())


def _documents(reader: ShardReader):
    """(doc id, source, tokens incl. eos) in stream order, reassembled across sample boundaries."""
    stream, ids, sources = [], [], []
    for i in range(len(reader)):
        meta = reader.meta(i)
        tokens = reader[i]
        stream.append(tokens[:len(tokens) - meta["pad_tokens"]])
        assert (tokens[len(tokens) - meta["pad_tokens"]:] == 1).all()
        for doc_id, source, start in zip(meta["doc_ids"], meta["sources"], meta["doc_starts"]):
            if not (start == 0 and ids and ids[-1] == doc_id):  # a continued document
                ids.append(doc_id)
                sources.append(source)
    stream = np.concatenate(stream).astype(np.int64)
    ends = np.flatnonzero(stream == 2) + 1
    assert ends[-1] == len(stream), "the stream must end with eos"
    docs = np.split(stream, ends[:-1])
    assert len(docs) == len(ids)
    return list(zip(ids, sources, docs)), stream


def _train_documents(out):
    """_documents of every source's training split, sources in name order."""
    parts = [_documents(ShardReader(d)) for d in sorted((out / "train").iterdir())]
    return [d for docs, _ in parts for d in docs], np.concatenate([stream for _, stream in parts])


def _train_splits(m):
    return {name: split for name, split in m["splits"].items() if name.startswith("train/")}


def test_manifest_counts(prepared):
    inputs, out, m = prepared
    lines = sum(len(f.read_bytes().splitlines()) for f in inputs.glob("*.jsonl"))
    assert m["input"]["lines"] == lines
    kept = m["totals"]["train"]["documents"] + m["totals"]["valid"]["documents"]
    assert kept + sum(m["drops"].values()) + sum(m["errors"].values()) == lines
    assert set(m["sources"]) == {"arxiv", "dna", "molecules", "proteins"}
    assert m["seq_len"] == SEQ_LEN and m["sample_len"] == SEQ_LEN + 1 and m["dtype"] == "uint16"
    assert m["vocab_size"] == 1200 and m["config"]["tokenizer"]["vocab_size"] == 1200
    tok = GalacticaTokenizer.load(out / "tokenizer")
    assert tok.sha256 == m["tokenizer"]["sha256"]
    assert (out / "tokenizer" / "hf" / "tokenizer.json").exists()
    for name, split in m["splits"].items():
        reader = ShardReader(out / name)
        assert len(reader) == split["samples"] == sum(s["samples"] for s in split["shards"])
        for shard in split["shards"]:
            assert hashlib.sha256((out / name / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
        assert split["tokens"] == len(reader) * (SEQ_LEN + 1) - split["pad_tokens"]
    assert len(m["splits"]["train/arxiv"]["shards"]) > 1
    for source, counts in m["sources"].items():
        assert counts["valid"]["documents"] >= 1, source
        assert f"valid/{source}" in m["splits"] and f"train/{source}" in m["splits"]
    # tokens per source and split are the packed tokens of that source's split
    for source, c in m["sources"].items():
        for split in ("train", "valid"):
            assert c[split]["tokens"] == m["splits"][f"{split}/{source}"]["tokens"], (source, split)
    assert set(_train_splits(m)) == {f"train/{s}" for s in m["sources"]}


def test_every_training_token_exactly_once(prepared):
    inputs, out, m = prepared
    tok = GalacticaTokenizer.load(out / "tokenizer")
    formats = {k: SourceFormat(**v) for k, v in yaml.safe_load((REPO / "conf/corpus/default.yaml").read_text()).items()}
    renderer = Renderer(formats)
    docs, stream = _train_documents(out)
    in_train = {doc_id for doc_id, _, _ in docs}
    by_source: dict[str, list] = {}
    for f in sorted(inputs.glob("*.jsonl")):
        for line in f.open():
            r = json.loads(line)
            if r["id"] in in_train:
                by_source.setdefault(r["source"], []).append(
                    (r["id"], np.array(tok.encode(renderer.render(r["source"], r)) + [2])))
    for s in by_source:  # document order: bucket (a hash of the id), then id (pretrain/data/stages.py)
        by_source[s].sort(key=lambda d: (bucket_of(d[0], m["units"]["buckets"]), d[0]))
    expected_ids = [i for s in sorted(by_source) for i, _ in by_source[s]]
    expected = [t for s in sorted(by_source) for _, t in by_source[s]]
    # every kept training document, once, in its source's shards, in document order
    assert [d[0] for d in docs] == expected_ids
    for (doc_id, _, got), want in zip(docs, expected):
        assert np.array_equal(got, want), doc_id
    want = np.concatenate(expected)
    assert len(stream) == len(want) == sum(s["tokens"] for s in _train_splits(m).values()) == m["totals"]["train"]["tokens"]
    assert hashlib.sha256(stream.tobytes()).hexdigest() == hashlib.sha256(want.astype(np.int64).tobytes()).hexdigest()
    assert m["totals"]["train"]["documents"] == len(docs)


def test_validation_never_in_training(prepared):
    _, out, m = prepared
    train_docs, _ = _train_documents(out)
    train_ids = {d[0] for d in train_docs}
    train_content = {hashlib.sha256(d[2].tobytes()).digest() for d in train_docs}
    salt, fraction = m["config"]["split"]["salt"], m["config"]["split"]["valid_fraction"]
    assert not any(is_validation(i, fraction, salt) for i in train_ids)
    n_valid = 0
    for source in m["sources"]:
        docs, _ = _documents(ShardReader(out / "valid" / source))
        n_valid += len(docs)
        for doc_id, src, tokens in docs:
            assert src == source and is_validation(doc_id, fraction, salt)
            assert doc_id not in train_ids
            assert hashlib.sha256(tokens.tobytes()).digest() not in train_content
    assert n_valid == m["totals"]["valid"]["documents"] > 0


def _read_all(directory):
    reader = ShardReader(directory)
    return [reader[i].copy() for i in range(len(reader))]


def test_index_reads_equal_sequential_webdataset(prepared):
    _, out, m = prepared
    for name in m["splits"]:
        reader = ShardReader(out / name)
        sequential = list(reader.webdataset())
        assert len(sequential) == len(reader)
        for i, sample in enumerate(sequential):
            assert sample["__key__"] == f"{i:09d}"
            assert sample["tokens.npy"].dtype == np.uint16
            assert np.array_equal(reader[i], sample["tokens.npy"])
            assert reader.meta(i) == sample["meta.json"]
        assert np.array_equal(reader[-1], sequential[-1]["tokens.npy"])
    reader = ShardReader(out / "train" / "arxiv")
    sequential = [s["tokens.npy"] for s in reader.webdataset()]
    for i in np.random.default_rng(0).permutation(len(reader)):  # random access in any order
        assert np.array_equal(reader[int(i)], sequential[i])
    reader[0]  # opens descriptors in the parent, then read in forked children
    with multiprocessing.get_context("fork").Pool(2) as pool:
        forked = pool.map(_read_all, [out / "train" / "arxiv"] * 2)
    for child in forked:
        assert all(np.array_equal(a, reader[i]) for i, a in enumerate(child))
    with pytest.raises(IndexError, match="out of range"):
        reader[len(reader)]


def test_packer_pads_only_the_last_sample_and_picks_dtype(tmp_path):
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(4, 70000, rng.integers(1, 40)), 2) for _ in range(50)]
    writer = ShardWriter(tmp_path / "t", sample_len=17, dtype=token_dtype(70000), samples_per_shard=7)
    packer = Packer(writer, pad_id=1)
    for k, d in enumerate(docs):
        packer.add(f"d{k}", "src", d)
    info = packer.finish()
    total = sum(len(d) for d in docs)
    assert info["dtype"] == "uint32" and token_dtype(65536) == np.uint16
    assert info["num_samples"] == -(-total // 17) and info["pad_tokens"] == info["num_samples"] * 17 - total
    reader = ShardReader(tmp_path / "t")
    stream = np.concatenate([reader[i] for i in range(len(reader))])
    assert np.array_equal(stream[:total], np.concatenate(docs)) and (stream[total:] == 1).all()
    assert [reader.meta(i)["pad_tokens"] for i in range(len(reader))][:-1] == [0] * (len(reader) - 1)


def test_damaged_shards_are_named_on_read_and_by_gal_verify(prepared, tmp_path):
    import shutil
    import subprocess

    from helpers import BIN
    from pretrain.config import ConfigError
    from pretrain.data.shards import TrainSplit

    _, out, m = prepared
    ok = subprocess.run([str(BIN / "gal-verify"), str(out)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "every shard matches" in ok.stdout
    split = out / "train" / "arxiv"
    index = np.load(split / "index.npy")
    assert "crc32" in index.dtype.names

    flipped = tmp_path / "flipped"
    shutil.copytree(out, flipped)
    shard = flipped / "train" / "arxiv" / "shard-000001.tar"
    row = index[np.flatnonzero(index["shard"] == 1)[3]]
    data = bytearray(shard.read_bytes())
    data[int(row["tokens_offset"]) + 10] ^= 0x01  # one bit of one token
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    i = int(np.flatnonzero(index["shard"] == 1)[3])
    with pytest.raises(ConfigError, match=rf"shard-000001\.tar: sample {i} does not match its checksum .* gal-verify"):
        ShardReader(flipped / "train" / "arxiv")[i]
    bad = subprocess.run([str(BIN / "gal-verify"), str(flipped)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "shard-000001.tar: sha256" in bad.stderr and f"sample {i} does not match" in bad.stderr

    shifted = tmp_path / "shifted"
    shutil.copytree(out, shifted)
    moved = index.copy()
    moved["tokens_offset"] += 2  # every sample read one token off
    np.save(shifted / "train" / "arxiv" / "index.npy", moved)
    with pytest.raises(ConfigError, match=r"shard-000000\.tar: sample 0 does not match its checksum"):
        TrainSplit(shifted)[0]

    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    (truncated / "train" / "arxiv" / "shard-000000.tar").chmod(0o644)  # shards are written read-only
    with open(truncated / "train" / "arxiv" / "shard-000000.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ConfigError, match=r"shard-000000\.tar: 1000 bytes, index\.json records \d+: the shards are damaged"):
        TrainSplit(truncated)

    with pytest.raises(ConfigError, match=r"sample 0 holds token id \d+, not below the vocabulary's 100"):
        TrainSplit(out, vocab_size=100)[0]  # model.vocab_size below the shards' ids
