"""gal-prepare: markup, cleaning, dedup, split determinism, overwrite, atomicity, the built-in sample."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, make_cfg, run_cli, write_jsonl

from pretrain.data import shards as shards_module
from pretrain.data.clean import clean_text
from pretrain.data.config import ConfigError
from pretrain.data.markup import Renderer
from pretrain.data.pipeline import builtin_sample_files, prepare
from pretrain.data.shards import ShardReader, TrainSplit
from pretrain.tokenizer import GalacticaTokenizer


@pytest.fixture(scope="module")
def sample_docs():
    """Real documents: the built-in sample's docstrings."""
    path = [f for f in builtin_sample_files() if f.name.startswith("docstrings")][0]
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for _, line in zip(range(200), f)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, sample_docs):
    """A small tokenizer, so that pipeline tests need not train one each."""
    out = tmp_path_factory.mktemp("tok")
    GalacticaTokenizer.train((d["text"] for d in sample_docs), out, vocab_size=600, progress=False)
    return out / "tokenizer.model"


def _splits_by_id(out) -> dict[str, str]:
    split = {}
    for name in json.loads((out / "manifest.json").read_text())["splits"]:
        reader = ShardReader(out / name)
        for i in range(len(reader)):
            for doc_id in reader.meta(i)["doc_ids"]:
                split[doc_id] = name.split("/")[0]
    return split


# ----------------------------------------------------------------------------- markup and cleaning
def test_markup_templates():
    r = Renderer(make_cfg().corpus)
    assert r.render("molecules", {"smiles": "CC(=O)O", "name": "acetic acid", "properties": {"mp": "16.6 °C"}}) == \
        "acetic acid\n\n[START_SMILES]CC(=O)O[END_SMILES]\n\nFormula: C2H4O2\n\nmp: 16.6 °C"
    for iso, formula in (("C[C@H](N)C(=O)O", "C3H7NO2"), ("C/C=C/C", "C4H8"), ("C/C=C\\C", "C4H8")):
        assert r.render("molecules", {"smiles": iso}) == f"[START_I_SMILES]{iso}[END_I_SMILES]\n\nFormula: {formula}"
    assert r.render("proteins", {"sequence": "mkv lli\nAG", "description": "a protein"}) == \
        "a protein\n\n[START_AMINO]MKVLLIAG[END_AMINO]"
    assert r.render("dna", {"sequence": "acgt\nACGTN"}) == "[START_DNA]ACGTACGTN[END_DNA]"
    assert r.render("arxiv", {"text": "We use <work> x = 1 </work> here.", "title": None}) == \
        "We use <work> x = 1 </work> here."
    doc = "Notes.\n\nReferences\n----------\n.. [1] G. Strang, Linear Algebra and Its Applications, 1988."
    assert r.render("docstrings", {"title": "f", "text": doc}).endswith(
        ".. [1] [START_REF]G. Strang, Linear Algebra and Its Applications, 1988.[END_REF]")
    with pytest.raises(ConfigError, match=r"corpus.x.template: unknown formatter 'nope'"):
        Renderer({"x": type(r.formats["arxiv"])(template=["{a|nope}"])})


def test_molecular_formula_equals_rdkit_full_sanitization(shared_corpus):
    """The formula step runs part of RDKit's sanitization (pretrain/data/markup.py); every 5th molecule of
    the shared corpus and the hard cases (charges, isotopes, aromatic N-H, organometallics, bad valence) give
    the formula, or None, of MolFromSmiles' full sanitization."""
    from rdkit import Chem
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    from pretrain.data.markup import molecular_formula
    with open(shared_corpus / "molecules.jsonl") as f:
        smiles = [json.loads(line)["smiles"] for line in f][::5]
    smiles += ["[NH4+]", "[2H]C", "c1cc[nH]c1", "n1cccc1", "c1cccc1", "C(C)(C)(C)(C)C", "[se]1cccc1",
               "O=[N+]([O-])c1ccccc1", "[Fe+2].[Cl-].[Cl-]", "B1=CC=CC=C1", "not a smiles"]
    ours = [molecular_formula(s) for s in smiles]
    full = [(lambda m: m and CalcMolFormula(m))(Chem.MolFromSmiles(s)) for s in smiles]
    assert ours == full and full[-8:-5] == [None] * 3 and full[-1] is None and len(smiles) > 10000


# Real abstracts of ../shared/corpus/arxiv.jsonl: id → (what the text holds, what the document holds)
PAPER_CITATIONS = {
    "arxiv:2604.17637": ("the study of Shafter et al. (2015) who", "the study of [START_REF]Shafter et al. (2015)[END_REF] who"),
    "arxiv:2606.30504": ("GW170817 (Abbott et al. 2017) assumes", "GW170817 ([START_REF]Abbott et al. 2017[END_REF]) assumes"),
    "arxiv:2506.09962": ("(D'Agostino et al. 2019; Johnston et al. 2023).",
                         "([START_REF]D'Agostino et al. 2019[END_REF]; [START_REF]Johnston et al. 2023[END_REF])."),
    "arxiv:2606.25163": ("Universe \\citep{vanDokkum2015}.", "Universe \\citep{[START_REF]vanDokkum2015[END_REF]}."),
    "arxiv:2502.06936": ("work [arXiv:1701.07596], where", "work [[START_REF]arXiv:1701.07596[END_REF]], where"),
    # left alone: a numeric citation, crystal directions, "et al" without a year
    "arxiv:2511.08196": ("simplex [32]. The", "simplex [32]. The"),
    "arxiv:2603.18885": ("along [001] and [110]. At", "along [001] and [110]. At"),
    "arxiv:2505.22676": ("arXiv:2403.01974, Altshuler et al suggested",
                         "[START_REF]arXiv:2403.01974[END_REF], Altshuler et al suggested"),
}


def test_paper_citations_are_wrapped_on_real_abstracts(shared_corpus):
    records = {}
    with open(shared_corpus / "arxiv.jsonl") as f:
        for line in f:
            if (record := json.loads(line))["id"] in PAPER_CITATIONS:
                records[record["id"]] = record
    assert set(records) == set(PAPER_CITATIONS)
    r = Renderer(make_cfg().corpus)
    for doc_id, (before, after) in PAPER_CITATIONS.items():
        assert before in records[doc_id]["text"], doc_id
        for source in ("arxiv", "arxiv_math", "papers"):  # the same template for every paper source
            assert after in r.render(source, records[doc_id]), (doc_id, source)
    # markup already in the input is kept, not wrapped twice
    assert r.render("arxiv", {"text": "[START_REF]Smith et al. 2019[END_REF] and Jones et al. 2020"}) == \
        "[START_REF]Smith et al. 2019[END_REF] and [START_REF]Jones et al. 2020[END_REF]"
    # a pasted sequence of 400k capitals: nothing to wrap, found in linear time (a match starting at every
    # capital inside the word took time quadratic in its length: about an hour for this one)
    dna = "ACGT" * 100_000 + " et al. and more"
    assert r.render("arxiv", {"text": dna}) == dna


def test_clean_keeps_superscripts_and_subscripts_distinct():
    assert clean_text("E = mc² and H₂O, x⁻¹") == \
        "E = mc[START_SUP]2[END_SUP] and H[START_SUB]2[END_SUB]O, x[START_SUP]-1[END_SUP]"
    assert clean_text("ﬁne  ｆｕｌｌ\u00a0space\u200b\r\n\r\n\r\n\tnext   \nline") == "fine full space\n\n\tnext\nline"
    assert clean_text("    indented   code") == "    indented code"


# ----------------------------------------------------------------------------- dedup and split
def test_dedup_exact_and_near_per_source_and_across(tmp_path, sample_docs, tokenizer_path):
    long_docs = [d for d in sample_docs if len(d["text"].split()) > 150 and ".. [" not in d["text"]][:24]
    # numpy.all/any, argmax/argmin and asarray/asanyarray (3, 5, 13, 14, 20, 21) are near-duplicate pairs
    # themselves (word 5-gram Jaccard 0.5-0.66); a, b, c, d share < 0.05 with every other document
    a, b, c, d = (long_docs[i] for i in (4, 6, 7, 17))
    base = [dict(d, id=f"base{k}") for k, d in enumerate(long_docs) if k in (0, 1, 2, 8, 9, 10, 11, 12, 15, 16, 18,
                                                                             19, 22, 23)]

    def one_word_changed(doc):
        words = doc["text"].split(" ")
        words[len(words) // 2] = "CHANGED"
        return " ".join(words)

    extra = [
        dict(a, id="a1"), dict(a, id="a2"),  # exact, same source
        dict(b, id="b1"), dict(b, id="b2", source="papers"),  # exact, across sources (same template)
        dict(c, id="c1"), dict(c, id="c2", text=one_word_changed(c)),  # near, same source
        dict(d, id="d1"), dict(d, id="d2", source="arxiv", text=one_word_changed(d)),  # near, across
    ]
    common = [f"tokenizer.path={tokenizer_path}", "shards.seq_len=127", "workers=2"]
    write_jsonl(tmp_path / "base.jsonl", base)
    m0 = prepare(make_cfg(f"input={tmp_path}/base.jsonl", f"output={tmp_path}/o0", *common), progress=False)
    write_jsonl(tmp_path / "more.jsonl", base + extra)
    m1 = prepare(make_cfg(f"input={tmp_path}/more.jsonl", f"output={tmp_path}/o1", *common), progress=False)
    added = {k: m1["dedup"].get(k, 0) - m0["dedup"].get(k, 0) for k in m1["dedup"]}
    assert added == {"exact_duplicate_same_source": 1, "exact_duplicate_cross_source": 1, "near_duplicate": 2}
    # the copy kept: within a source the first by id; across sources the higher-priority source's (the
    # corpus config's order: arxiv and papers come before docstrings)
    kept = set(_splits_by_id(tmp_path / "o1"))
    assert {"a1", "b2", "c1", "d2"} <= kept and not {"a2", "b1", "c2", "d1"} & kept
    # near-dedup off: span dedup cuts the near copies' repeated paragraphs (all but the one with the change)
    m2 = prepare(make_cfg(f"input={tmp_path}/more.jsonl", f"output={tmp_path}/o2", "dedup.near=false", *common),
                 progress=False)
    cut = m2["span_dedup"]["bytes_removed"]["docstrings"] - m0["span_dedup"]["bytes_removed"].get("docstrings", 0)
    assert cut > 0.7 * (len(c["text"]) + len(d["text"]))
    # and span dedup off too: the near copies stay, the exact ones still go
    m3 = prepare(make_cfg(f"input={tmp_path}/more.jsonl", f"output={tmp_path}/o3", "dedup.near=false",
                          "dedup.span_min_bytes=0", *common), progress=False)
    assert set(m3["dedup"]) == {"exact_duplicate_same_source", "exact_duplicate_cross_source"}
    assert {"c2", "d1"} <= set(_splits_by_id(tmp_path / "o3"))


def test_split_is_stable_when_documents_are_added(tmp_path, sample_docs, tokenizer_path):
    common = [f"tokenizer.path={tokenizer_path}", "shards.seq_len=127", "split.valid_fraction=0.3", "dedup.near=false"]
    write_jsonl(tmp_path / "a.jsonl", sample_docs[:60])
    write_jsonl(tmp_path / "b.jsonl", sample_docs[60:120])
    prepare(make_cfg(f"input={tmp_path}/a.jsonl", f"output={tmp_path}/small", *common), progress=False)
    prepare(make_cfg(f"input=[{tmp_path}/a.jsonl,{tmp_path}/b.jsonl]", f"output={tmp_path}/big", "workers=1", *common),
            progress=False)
    small, big = _splits_by_id(tmp_path / "small"), _splits_by_id(tmp_path / "big")
    assert len(big) > len(small) > 0 and {"train", "valid"} == set(small.values())
    assert all(big[i] == s for i, s in small.items())
    # and the same input twice gives byte-identical shards (1 and 2 workers alike)
    prepare(make_cfg(f"input={tmp_path}/a.jsonl", f"output={tmp_path}/again", "workers=1", *common), progress=False)
    written = sorted(p.relative_to(tmp_path / "small") for p in (tmp_path / "small").glob("*/*/*") if p.is_file())
    assert written and any(str(p).startswith("train/") for p in written)
    for name in written:
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


# ----------------------------------------------------------------------------- output directory safety
def test_overwrite_refused_then_allowed(tmp_path, sample_docs, tokenizer_path):
    write_jsonl(tmp_path / "a.jsonl", sample_docs[:30])
    args = [f"input={tmp_path}/a.jsonl", f"output={tmp_path}/out", f"tokenizer.path={tokenizer_path}", "shards.seq_len=127"]
    prepare(make_cfg(*args), progress=False)
    (tmp_path / "out" / "marker").write_text("old")
    with pytest.raises(FileExistsError, match="already exists: pass overwrite=true"):
        prepare(make_cfg(*args), progress=False)
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2 and "overwrite=true" in proc.stderr
    assert (tmp_path / "out" / "marker").exists()
    prepare(make_cfg(*args, "overwrite=true"), progress=False)
    assert not (tmp_path / "out" / "marker").exists() and (tmp_path / "out" / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]  # no temporaries left
    # overwrite=true replaces a shard set, never a directory of something else
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    proc = run_cli(*args[:1], f"output={mine}", *args[2:], "overwrite=true", check=False)
    assert proc.returncode == 2 and "is not a gal-prepare shard set (no manifest.json)" in proc.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_interrupted_run_leaves_no_manifest_and_resumes(tmp_path, sample_docs, tokenizer_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", sample_docs[:100])
    args = [f"input={tmp_path}/a.jsonl", f"output={tmp_path}/out", f"tokenizer.path={tokenizer_path}", "shards.seq_len=63",
            "shards.samples_per_shard=1"]
    real_write, calls = shards_module.ShardWriter.write, []

    def failing_write(self, tokens, meta):  # the disk fills up after 5 samples
        calls.append(1)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        real_write(self, tokens, meta)

    monkeypatch.setattr(shards_module.ShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        prepare(make_cfg(*args, "workers=1"), progress=False)
    # no output; the work directory stays, with the finished stages marked complete (datatrove)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.work", "a.jsonl"]
    assert list((tmp_path / ".out.work" / "logs").glob("read-*/completions/00000"))
    monkeypatch.undo()
    prepare(make_cfg(*args), progress=False)  # the same command resumes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]
    reference = _shard_hashes(tmp_path / "out")
    # killed with SIGKILL while writing shards: no output directory; the same command resumes and gives
    # the same shards as an uninterrupted run
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    again = [args[0], f"output={tmp_path}/again", *args[2:]]
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.prepare", *again], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".again.work/out/train/*/shard-000003.tar")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "again").exists() and (tmp_path / ".again.work").exists()
    prepare(make_cfg(*again), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "again", "out"]
    assert _shard_hashes(tmp_path / "again") == reference


def _shard_hashes(out) -> dict[str, str]:
    """Every split's shards, by name: sha256 (as the manifest records them)."""
    m = json.loads((out / "manifest.json").read_text())
    return {f"{name}/{s['name']}": s["sha256"] for name, split in m["splits"].items() for s in split["shards"]}


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^on_error='ignore': must be raise or skip"):
        prepare(make_cfg("on_error=ignore", f"output={tmp_path}/o"), progress=False)
    with pytest.raises(ConfigError, match=r"^split.valid_fraction=1.5"):
        prepare(make_cfg("split.valid_fraction=1.5", f"output={tmp_path}/o"), progress=False)
    proc = run_cli("tokenizer.vocab_size=many", f"output={tmp_path}/o", check=False)
    assert proc.returncode != 0 and "tokenizer.vocab_size" in proc.stderr


# ----------------------------------------------------------------------------- the built-in sample
def test_no_arguments_prepares_the_builtin_sample(tmp_path):
    run_cli(cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # Hydra left nothing in the cwd
    out = tmp_path / "data" / "sample_shards"
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["sources"]) == {"docstrings", "molecules"}
    assert m["vocab_size"] == 8000 and m["seq_len"] == 2048 and m["dtype"] == "uint16"
    assert m["config"]["input"] is None and m["errors"] == {}
    assert (m["tokenizer"]["kind"], m["tokenizer"]["model"], m["tokenizer"]["hf"]) == \
        ("sentencepiece", "tokenizer/tokenizer.model", "tokenizer/hf")
    assert m["tokenizer"]["special_ids"]["[END_I_SMILES]"] == 22 and m["tokenizer"]["from"] == "trained"
    assert m["splits"]["train/docstrings"]["samples"] > 300 and m["splits"]["valid/docstrings"]["samples"] > 10
    tok = GalacticaTokenizer.load(out / "tokenizer")
    reader = TrainSplit(out)
    text = tok.decode(np.concatenate([reader[i] for i in range(len(reader))]).tolist())
    for marker in ("[START_I_SMILES]", "[START_SMILES]", "[START_REF]", "$"):
        assert marker in text
