"""gal-prepare beyond one machine (datatrove stages): the output does not depend on the task count, a bad
line in a later chunk is named by its file line, span-level dedup (Galactica §A.2) and its fingerprints."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from helpers import SCALE_ARGS, make_cfg, scale_inputs, shard_set_digest, write_jsonl

from pretrain.data.pipeline import prepare
from pretrain.data.read import BadInput
from pretrain.data.shards import ShardReader
from pretrain.data.spans import cut_repeats, fingerprints, window_sizes
from pretrain.tokenizer import load_tokenizer


@pytest.mark.slow
def test_one_and_four_tasks_give_the_same_shard_set(tmp_path, shared_corpus):
    inputs = scale_inputs(tmp_path, shared_corpus)
    common = [f"input=[{','.join(inputs)}]", *SCALE_ARGS]
    one = prepare(make_cfg(*common, f"output={tmp_path}/one", "tasks=1", "workers=1"), progress=False)
    four = prepare(make_cfg(*common, f"output={tmp_path}/four", "tasks=4", "workers=2"), progress=False)
    assert one["units"]["buckets"] == 5 and one["units"]["chunks"] >= 6  # plain files in chunks of 0.25 MB
    m1, files1 = shard_set_digest(tmp_path / "one")
    m4, files4 = shard_set_digest(tmp_path / "four")
    assert m1 == m4 and files1 == files4
    assert {"train/arxiv", "valid/arxiv", "train/molecules", "train/docstrings"} <= set(m1["splits"])
    assert m1["dedup"]["exact_duplicate_same_source"] >= 10 and m1["span_dedup"]["bytes_removed"]["arxiv"] > 3000
    assert m1["probes"]["molecules"]["records"] > 0 and (tmp_path / "four" / "probes" / "molecules.jsonl").exists()
    # every shard's sha256 in the manifest is the file's
    for name, split in m1["splits"].items():
        for shard in split["shards"]:
            assert files1[f"{name}/{shard['name']}"] == shard["sha256"]


def test_bad_line_in_a_later_chunk_is_named_by_its_file_line(tmp_path):
    rng = random.Random(0)
    good = [{"id": f"d{i}", "source": "arxiv", "text": _words(rng, 90)} for i in range(400)]
    lines = [json.dumps(r).encode() + b"\n" for r in good]
    lines[300] = b'{"id": "bad", "source": "arxiv", "text": \n'  # line 301, well past the first chunk
    write_jsonl(tmp_path / "in.jsonl", lines)
    assert (tmp_path / "in.jsonl").stat().st_size > 4 * 0.05 * 2**20
    args = [f"input={tmp_path}/in.jsonl", "chunk_mb=0.05", "tokenizer.vocab_size=400", "shards.seq_len=127"]
    with pytest.raises(BadInput, match=rf"^{tmp_path}/in.jsonl:301: invalid JSON"):
        prepare(make_cfg(*args, f"output={tmp_path}/a"), progress=False)
    m = prepare(make_cfg(*args, f"output={tmp_path}/b", "on_error=skip"), progress=False)
    assert m["units"]["chunks"] >= 4 and m["input"]["lines"] == 400
    assert m["bad_lines"] == [{"file": f"{tmp_path}/in.jsonl", "line": 301, "reason": "invalid_json"}]


# ----------------------------------------------------------------------------- span-level dedup
def _words(rng: random.Random, n: int) -> str:
    vocab = ["lattice", "phonon", "spin", "orbital", "doping", "band", "gap", "electron", "magnon", "vortex",
             "crystal", "field", "quantum", "thermal", "entropy", "density", "state", "wave", "mode", "charge"]
    return " ".join(rng.choice(vocab) + str(rng.randrange(1000)) for _ in range(n))


def test_span_dedup_cuts_a_repeated_paragraph_from_all_but_the_first_document(tmp_path):
    rng = random.Random(0)
    planted = _words(rng, 40)[:299] + "."  # 300 bytes repeated in 6 documents of 3 sources
    short = "A sixty-byte sentence that each of the documents repeats: 60"  # 60 bytes
    assert len(planted.encode()) == 300 and len(short.encode()) == 60
    records = []
    for k, source in enumerate(["docstrings", "docstrings", "papers", "papers", "arxiv", "arxiv"]):
        body = [_words(rng, 60), short, _words(rng, 50)]  # the 60-byte repeat between unique paragraphs
        body.insert(3 * (k % 2), planted)
        records.append({"id": f"{'zyxwvu'[k]}-{source}", "source": source, "text": "\n\n".join(body)})
    # filler, so that the tokenizer has something to learn from; no repeats in it
    records += [{"id": f"f{i}", "source": "docstrings", "text": _words(rng, 80)} for i in range(60)]
    write_jsonl(tmp_path / "in.jsonl", records)
    m = prepare(make_cfg(f"input={tmp_path}/in.jsonl", f"output={tmp_path}/out", "split.valid_fraction=0",
                         "tokenizer.vocab_size=600", "shards.seq_len=127", "dedup.near=false", "buckets=3"),
                progress=False)
    # the first document in priority order (arxiv, the first source of the corpus config; then by id:
    # "u-arxiv") keeps it, the five others lose it; the 60-byte repeat stays everywhere
    texts = _documents(tmp_path / "out", m)
    assert [doc_id for doc_id, text in texts.items() if planted in text] == ["u-arxiv"]
    assert all(short in texts[r["id"]] for r in records[:6])
    assert m["span_dedup"]["bytes_removed"] == {"arxiv": 302, "docstrings": 604, "papers": 604}  # + "\n\n" each


def _documents(out, manifest) -> dict[str, str]:
    """Every document of the shard set, decoded: id → text."""
    tok = load_tokenizer(out / manifest["tokenizer"]["model"])
    docs: dict[str, list[int]] = {}
    for name in manifest["splits"]:
        reader = ShardReader(out / name)
        for i in range(len(reader)):
            tokens, meta = reader[i].tolist(), reader.meta(i)
            starts = meta["doc_starts"] + [len(tokens) - meta["pad_tokens"]]
            for doc_id, a, b in zip(meta["doc_ids"], starts, starts[1:]):
                docs.setdefault(doc_id, []).extend(tokens[a:b])
    return {doc_id: tok.decode([t for t in ids if t != tok.eos_id]) for doc_id, ids in docs.items()}


def test_fingerprints_find_every_shared_span_of_min_bytes_and_none_shorter_than_the_window():
    rng = random.Random(1)
    k, w = window_sizes(100)
    assert k + w - 1 == 100 and w < k

    def text(n, alphabet):
        return "".join(rng.choice(alphabet) for _ in range(n))

    for _ in range(200):
        for length, found in ((100, True), (k - 1, False)):
            shared = text(length, "abcdefgh ijklmnop")
            x = text(rng.randrange(300), "QRST") + shared + text(50, "QRST")
            y = text(80, "UVW") + shared + text(rng.randrange(300), "UVW")
            common = set(fingerprints(x.encode(), 100)[0].tolist()) & set(fingerprints(y.encode(), 100)[0].tolist())
            assert bool(common) is found
    assert len(fingerprints(b"x" * (k - 1), 100)[0]) == 0


def test_cut_removes_paragraphs_mostly_covered():
    a, b, c = "first " * 30, "second " * 30, "third " * 30
    text = f"{a}\n\n{b}\n\n{c}"
    k, _ = window_sizes(100)
    start = len(f"{a}\n\n".encode())
    offsets = np.arange(start, start + len(b) - k + 1, 10, dtype=np.uint32)  # repeats over all of b
    rest, removed = cut_repeats(text, offsets, 100)
    assert rest == f"{a}\n\n{c}" and removed == len(b) + 2
    assert cut_repeats(text, offsets[:2], 100) == (text, 0)  # under half of b covered: kept


def test_slurm_executor_needs_a_partition(tmp_path):
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError, match=r"^slurm.partition=None: executor=slurm needs the partition"):
        prepare(make_cfg("executor=slurm", f"output={tmp_path}/o"), progress=False)


# ----------------------------------------------------------------------------- MinHash signatures
def test_signatures_equal_datatrove_own_methods(tmp_path):
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    from pretrain.data.dedup import ScienceWords, Signatures, minhash_config

    config = minhash_config(shingle_words=5, bands=14, rows=8)
    ours = Signatures(str(tmp_path / "a"), config)
    theirs = MinhashDedupSignature(str(tmp_path / "b"), config, ScienceWords())
    rng = random.Random(1)
    texts = [_words(rng, n) for n in (5, 6, 40, 300)] + ["Émile's CO2 + H2O -> H2CO3, twice: CO2 + H2O -> H2CO3."]
    for text in texts:
        shingles = ours.get_shingles(text)
        assert shingles.tolist() == theirs.get_shingles(text).tolist() and len(shingles) > 0
        assert ours.get_signature(shingles) == theirs.get_signature(shingles)
    assert ours.get_shingles("only four words here").shape == theirs.get_shingles("only four words here").shape


def test_gal_prepare_imports_no_torch_before_the_pack_stage():
    """torch (which webdataset imports) is 220 MB and a second of start-up in every task process; only the
    pack stage writes tars, so only it imports webdataset (Stage.imports, pretrain/data/shards.py)."""
    code = ("import sys, pretrain.prepare, pretrain.data.pipeline as p; "
            "print([s.__name__ for s in p.STAGES if s.imports], sorted(m for m in sys.modules if m.startswith('torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['Pack'] []"
