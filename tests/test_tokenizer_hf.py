"""gal-prepare tokenizer.from_hf= (issue 13): shards prepared with an existing Hugging Face tokenizer.json.

The tokenizer is built here with the `tokenizers` library the way the released Galactica's is made
(byte-level BPE; Galactica's special tokens at the released ids 0-22; a pre-tokenizer that removes
galai's split marker, splits digits and applies the math rule), trained on a few thousand real documents.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from helpers import events, galai_escape, make_cfg, run_cli, steps, subset, tiny_opt, train
from pretrain.data.config import ConfigError
from pretrain.data.markup import Renderer
from pretrain.data.pipeline import prepare
from pretrain.data.shards import ShardReader
from pretrain.tokenizer import SPECIAL_TOKENS, SPLIT_MARKER, HFTokenizer, load_tokenizer
from pretrain.tokenizer.escape import SPAN_RE
from pretrain.tokenizer.tokenizer import MATH_SPLIT_RE

# ~1,000 real documents of ../shared/corpus, with sequences of every kind
CORPUS_LINES = {"arxiv": 600, "molecules": 320, "proteins": 60, "dna": 20}


def galactica_like(texts: list[str], vocab_size: int, specials: list[str] = SPECIAL_TOKENS,
                   split_marker: bool = True) -> Tokenizer:
    """A byte-level BPE with the released tokenizer's pipeline: NFKC, then split marker removed, digits
    and the math rule split, byte level; `specials` get ids 0, 1, 2, ... (the released order)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFKC()
    steps = [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.Split(Regex(MATH_SPLIT_RE.pattern), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False)]
    if split_marker:
        steps.insert(0, pre_tokenizers.Split(SPLIT_MARKER, behavior="removed"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def rendered(path, source: str, renderer: Renderer) -> dict[str, str]:
    """id → the document text gal-prepare renders (Galactica markup), for the records of a JSONL file."""
    docs = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            docs[str(record["id"])] = renderer.render(source, record)
    return docs


@pytest.fixture(scope="module")
def corpus_subset(shared_corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    return {name: subset(shared_corpus / f"{name}.jsonl", root / f"{name}.jsonl", n) for name, n in CORPUS_LINES.items()}


@pytest.fixture(scope="module")
def hf_folder(shared_corpus, tmp_path_factory):
    """A tokenizer folder like a downloaded facebook/galactica-*: tokenizer.json (+ tokenizer_config.json),
    trained on 3,000 other documents (escaped, as galai feeds the released tokenizer)."""
    renderer = Renderer(make_cfg().corpus)
    texts = []
    for name, first, n in [("arxiv", 1000, 2000), ("molecules", 1000, 800), ("proteins", 100, 150), ("dna", 30, 50)]:
        with open(shared_corpus / f"{name}.jsonl") as f:
            lines = [line for i, line in zip(range(first + n), f) if i >= first]
        texts += [galai_escape(renderer.render(name, json.loads(line))) for line in lines]
    folder = tmp_path_factory.mktemp("galactica-tiny")
    galactica_like(texts, vocab_size=3000).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def shard_documents(out, name: str) -> list[tuple[str, list[int]]]:
    """The documents of a split directory, in order, each (id, its tokens)."""
    return [(doc_id, tokens.tolist()) for doc_id, tokens in ShardReader(out / name).documents()]


@pytest.fixture(scope="module")
def prepared(corpus_subset, hf_folder, tmp_path_factory):
    """The real gal-prepare tokenizer.from_hf= on the ~1,000 documents."""
    out = tmp_path_factory.mktemp("prepared") / "shards"
    inputs = ",".join(str(p) for p in corpus_subset.values())
    run_cli(f"input=[{inputs}]", f"output={out}", f"tokenizer.from_hf={hf_folder}", "shards.seq_len=255", "workers=2")
    return out


def test_prepare_from_hf_gives_the_tokenizers_ids(corpus_subset, hf_folder, prepared):
    out = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    reference = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))

    # the manifest: the tokenizer's own hash, kind, source, vocabulary and ids; a copy in the shard set
    raw = (hf_folder / "tokenizer.json").read_bytes()
    t = manifest["tokenizer"]
    assert t["sha256"] == hashlib.sha256(raw).hexdigest() and (out / t["model"]).read_bytes() == raw
    assert (t["kind"], t["from"], t["model"], t["hf"], t["trained_on_documents"]) == \
        ("hf", str(hf_folder), "tokenizer/tokenizer.json", "tokenizer", 0)
    assert manifest["vocab_size"] == t["vocab_size"] == reference.get_vocab_size(with_added_tokens=True) == 3000
    assert t["special_ids"] == {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    assert (manifest["eos_id"], manifest["pad_id"], manifest["dtype"]) == (2, 1, "uint16")
    assert (out / "tokenizer" / "tokenizer_config.json").is_file() and not (out / "tokenizer" / "tokenizer.model").exists()
    assert load_tokenizer(out / t["model"]).sha256 == t["sha256"]

    # every document's tokens: the reference tokenizer's ids on galai's escaping of the marked-up text, then eos
    renderer = Renderer(make_cfg().corpus)
    texts = {}
    for name, path in corpus_subset.items():
        texts.update(rendered(path, name, renderer))
    seen, spans = 0, 0
    for name in manifest["splits"]:
        for doc_id, tokens in shard_documents(out, name):
            text = texts[doc_id]
            assert tokens == reference.encode(galai_escape(text), add_special_tokens=False).ids + [2], doc_id
            seen += 1
            # SMILES, amino-acid and DNA spans: one token per character
            for m in SPAN_RE.finditer(text):
                start, end = SPECIAL_TOKENS.index(f"[START_{m.group(1)}]"), SPECIAL_TOKENS.index(f"[END_{m.group(1)}]")
                i = tokens.index(start)
                assert tokens[i + 1 + len(m.group(2))] == end
                assert [reference.decode([j]) for j in tokens[i + 1:i + 1 + len(m.group(2))]] == list(m.group(2))
                spans += 1
    kept = sum(c["documents"] for s in manifest["sources"].values() for c in s.values())
    assert seen == kept > 900 and spans > 350
    assert set(manifest["sources"]) == set(CORPUS_LINES)
    tokens = np.concatenate([ShardReader(out / name)[0] for name in manifest["splits"]])
    assert tokens.max() < 3000


@pytest.mark.trainer
def test_a_checkpoint_of_that_vocabulary_trains_on_the_shards(hf_folder, prepared, tmp_path):
    checkpoint = tmp_path / "galactica-tiny"  # a released-like folder: weights, config.json, its tokenizer.json
    tiny_opt(checkpoint, "bias_affine", vocab_size=3000, max_positions=256)
    shutil.copyfile(hf_folder / "tokenizer.json", checkpoint / "tokenizer.json")
    run = tmp_path / "run"
    train(1, run, prepared, f"model.init_from={checkpoint}", "trainer.global_batch_tokens=510",
          "optim.warmup_tokens=510", "trainer.max_tokens=1020", "logger.wandb=false")
    rows = steps(run)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert events(run, "start")[0]["init_from"] == str(checkpoint)
    assert "vocab_size: 3000" in (run / "config.yaml").read_text()


def test_from_hf_refuses_a_folder_without_tokenizer_json(corpus_subset, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(f"input={corpus_subset['arxiv']}", f"output={tmp_path}/o", f"tokenizer.from_hf={empty}", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (f"gal-prepare: error: tokenizer.from_hf: {empty}: no tokenizer.json there; give a Hugging "
                        "Face tokenizer folder (e.g. a downloaded facebook/galactica-1.3b)")
    assert not (tmp_path / "o").exists()


def test_from_hf_refuses_a_tokenizer_without_the_pipelines_tokens(corpus_subset, tmp_path):
    texts = ["C(C(=O)O)N and some text about proteins 123"] * 20
    common = [f"input={corpus_subset['arxiv']}", f"output={tmp_path}/o", "max_docs_per_file=20"]
    cases = [
        (galactica_like(texts, 400, specials=["<s>", "<pad>", "</s>", "<unk>"]),
         r"lacks \[START_REF\], \[END_REF\], <work>, </work>, \[START_SUP\].* as single tokens"),
        (galactica_like(texts, 400, specials=["<s>", "<pad>", "<unk>"] + SPECIAL_TOKENS[4:]), r"lacks </s> as single"),
        (galactica_like(texts, 400, split_marker=False), r"its pre-tokenizer does not remove galai's split marker"),
    ]
    for i, (tok, message) in enumerate(cases):
        folder = tmp_path / f"t{i}"
        folder.mkdir()
        tok.save(str(folder / "tokenizer.json"))
        with pytest.raises(ConfigError, match=rf"^tokenizer.from_hf: {folder}/tokenizer.json:? {message}"):
            prepare(make_cfg(*common, f"tokenizer.from_hf={folder}"), progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(ConfigError, match=r"^tokenizer.from_hf: .*/bad/tokenizer.json: not a Hugging Face tokenizer.json"):
        prepare(make_cfg(*common, f"tokenizer.from_hf={tmp_path / 'bad'}"), progress=False)
    with pytest.raises(ConfigError, match=r"^tokenizer.from_hf='x': tokenizer.path='y.model' is set too"):
        prepare(make_cfg(*common, "tokenizer.from_hf=x", "tokenizer.path=y.model"), progress=False)
    assert not (tmp_path / "o").exists()


def test_hf_tokenizer_interface(hf_folder, tmp_path):
    tok = HFTokenizer.load(hf_folder)
    assert (tok.kind, tok.file_name, tok.vocab_size) == ("hf", "tokenizer.json", 3000)
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    text = "Glycine [START_I_SMILES]C(C(=O)O)N[END_I_SMILES] melts at 233 °C [START_REF]Taylor et al. 2022[END_REF]"
    ids = tok.encode(text)
    i = ids.index(21)  # [START_I_SMILES]: then one token per character, [END_I_SMILES]
    assert ids[i + 11] == 22 and [tok.decode([j]) for j in ids[i + 1:i + 11]] == list("C(C(=O)O)N")
    assert tok.decode(ids) == text and tok.piece_to_id("[START_REF]") == 4 and ids.count(4) == 1
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    # save: the exact bytes, and the companion files beside them
    path = tok.save(tmp_path / "copy")
    assert path.read_bytes() == (hf_folder / "tokenizer.json").read_bytes()
    assert (tmp_path / "copy" / "tokenizer_config.json").is_file()
    assert HFTokenizer.load(path).sha256 == tok.sha256
