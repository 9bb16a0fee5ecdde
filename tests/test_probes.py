"""Chemistry probes: LlaSMol's formula rule, the formula line of the molecules template, the probe
records gal-prepare writes, and the probes in a real gal-train run and in process (determinism)."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest
import torch
from rdkit import Chem
from rdkit.Chem.rdMolDescriptors import CalcMolFormula

from helpers import REPO, make_cfg, run_cli, write_run

from model import GalacticaLM, parallel
from pretrain.config import ValidationConf, model_preset
from pretrain.data.markup import Renderer
from pretrain.data.pipeline import builtin_sample_files
from pretrain.analysis.records import read_metrics
from pretrain.evaluation.probes import ChemistryProbes, formula_counts, formula_match, smiles_valid
from pretrain.tokenizer import GalacticaTokenizer


# ----------------------------------------------------------------------------- the S2F scorer
@pytest.mark.parametrize("predicted, gold, same", [
    ("C9H13NO2", "C9H13NO2", True),
    ("H13C9O2N", "C9H13NO2", True),          # any order
    ("NO2C9H13", "C9H13NO2", True),
    ("  C9H13NO2 ", "C9H13NO2", True),       # surrounding spaces (the model writes " C9H13NO2")
    ("C9H13N1O2", "C9H13NO2", True),         # an explicit 1
    ("CH3CH2OH", "C2H6O", True),             # a repeated element adds up
    ("C9H12NO2", "C9H13NO2", False),         # wrong counts
    ("C9H13NO", "C9H13NO2", False),
    ("C9H13N2O2", "C9H13NO2", False),
    ("C9H13NO2S", "C9H13NO2", False),        # an extra element
    ("C9H13N", "C9H13NO2", False),           # a missing one
    ("CL", "Cl", False),                     # case matters: carbon + "L" is not chlorine
    ("NH4+", "H4N+", True),                  # charges (RDKit writes them last)
    ("H4N", "H4N+", False),
    ("H4N-", "H4N+", False),
    ("Fe+3", "Fe+3", True),
    ("Fe+2", "Fe+3", False),
    ("Fe+1", "Fe+", True),
    ("", "C2H6O", False),                    # garbage is never a match
    ("C2H6O is ethanol", "C2H6O", False),
    ("c2h6o", "C2H6O", False),
    ("C2(H3)2O", "C2H6O", False),
    ("2C2H6O", "C2H6O", False),
    ("[START_SMILES]CCO[END_SMILES]", "C2H6O", False),
    ("C2H6O+-", "C2H6O", False),
])
def test_formula_match_llasmol_rule(predicted, gold, same):
    assert formula_match(predicted, gold) is same


def test_formula_counts_and_smiles_validity():
    assert formula_counts("C16H21ClNO2") == {"C": 16, "H": 21, "Cl": 1, "N": 1, "O": 2}
    assert formula_counts("H4N+") == {"H": 4, "N": 1, "+": 1}
    assert formula_counts("O-2") == {"O": 1, "-": 2}
    assert formula_counts("hello") is None
    with pytest.raises(ValueError, match="gold formula 'x' is not"):
        formula_match("C", "x")
    assert smiles_valid("CC(=O)O") and smiles_valid("C[C@H](N)C(=O)O")
    assert not smiles_valid("C1CC") and not smiles_valid("C(") and not smiles_valid("")


# ----------------------------------------------------------------------------- the template
def test_molecules_template_renders_the_rdkit_formula():
    r = Renderer(make_cfg().corpus)
    assert r.render("molecules", {"smiles": "CC(=O)O", "name": "acetic acid", "properties": {"mp": "16.6 °C"}}) == \
        "acetic acid\n\n[START_SMILES]CC(=O)O[END_SMILES]\n\nFormula: C2H4O2\n\nmp: 16.6 °C"
    assert r.formula_probe("molecules", {"smiles": "CC(=O)O", "name": "acetic acid"}) == {
        "prompt": "acetic acid\n\n[START_SMILES]CC(=O)O[END_SMILES]\n\nFormula:", "smiles": "CC(=O)O",
        "formula": "C2H4O2"}
    # a SMILES RDKit cannot parse: the document is kept without its formula line, and has no probe
    assert r.render("molecules", {"smiles": "C1CC", "name": "broken"}) == "broken\n\n[START_SMILES]C1CC[END_SMILES]"
    assert r.formula_probe("molecules", {"smiles": "C1CC"}) is None
    assert r.formula_probe("arxiv", {"text": "no molecules here"}) is None
    # every molecule of the built-in sample: the line is RDKit's formula, the prompt a prefix of the
    # document, and the sample's own (independently checked) "molecular formula" agrees with it
    path = [f for f in builtin_sample_files() if f.name.startswith("molecules")][0]
    records = [json.loads(line) for line in gzip.open(path, "rt")]
    for rec in records:
        gold = CalcMolFormula(Chem.MolFromSmiles(rec["smiles"]))
        text = r.render("molecules", rec)
        assert f"\n\nFormula: {gold}\n\n" in text
        probe = r.formula_probe("molecules", rec)
        assert probe["formula"] == gold and text.startswith(probe["prompt"] + " " + gold + "\n")
        assert formula_match(rec["properties"]["molecular formula"], gold), rec["name"]
    assert len(records) == 83


# ----------------------------------------------------------------------------- prepare, train, decode
# The tests below share gal-prepare of the whole built-in sample (~13 s on 2 cores); with decoding they
# take ~30 s, so they are `slow` (out of `make test-fast`).
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("probes") / "shards"
    run_cli("shards.seq_len=256", f"output={out}")
    return out


@pytest.mark.slow
def test_prepare_writes_the_held_out_probe_records(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    mol = manifest["sources"]["molecules"]
    assert mol["train"]["no_formula"] == 0 and mol["valid"]["no_formula"] == 0
    assert manifest["probes"] == {"molecules": {"path": "probes/molecules.jsonl", "records": mol["valid"]["documents"]}}
    records = [json.loads(line) for line in (shards / "probes" / "molecules.jsonl").read_text().splitlines()]
    assert len(records) == mol["valid"]["documents"] >= 2
    tok = GalacticaTokenizer.load(shards / "tokenizer")
    r = Renderer(make_cfg().corpus)
    sample = {json.loads(line)["id"]: json.loads(line)
              for line in gzip.open([f for f in builtin_sample_files() if f.name.startswith("molecules")][0], "rt")}
    for rec in records:
        assert rec["formula"] == CalcMolFormula(Chem.MolFromSmiles(rec["smiles"]))
        text = r.render("molecules", sample[rec["id"]])
        prompt_ids = tok.encode(rec["prompt"])
        assert tok.encode(text)[:len(prompt_ids)] == prompt_ids  # the prompt is tokenized as in training


@pytest.mark.slow
@pytest.mark.trainer
def test_probes_in_the_validation_rows_of_a_training_run(shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.train", f"data.path={shards}", f"run_dir={tmp_path / 'run'}", "model=tiny-2l",
         "validation=science", "trainer.global_batch_tokens=2048", "trainer.micro_batch_size=8",
         "trainer.max_tokens=8192", "optim.warmup_tokens=2048", "validation.interval_tokens=4096",
         "validation.max_samples_per_source=8", "validation.seen_samples=8", "validation.probe_smiles_samples=5",
         "validation.probe_smiles_max_new_tokens=24", "validation.probe_max_new_tokens=12", "logger.wandb=false",
         "deepspeed.precision=bf16"],  # the probes on the engine's bf16 weights, as on a GPU
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rounds = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "validation"]
    records = json.loads((shards / "manifest.json").read_text())["probes"]["molecules"]["records"]
    start = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "start")
    assert start["precision"] == "bf16"
    assert [r["step"] for r in rounds] == [0, 2, 4]  # validation.at_start: the fresh model's round too
    for r in rounds:
        p = r["probes"]
        assert 0 <= p["formula_exact_match"] <= 1 and 0 <= p["smiles_validity"] <= 1
        assert p["formula_molecules"] == records and p["smiles_samples"] == 5


@pytest.mark.slow
def test_probes_are_deterministic_and_batching_does_not_change_the_tokens(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    parallel.manual_seed(3)
    model = GalacticaLM(model_preset("tiny-2l", vocab_size=manifest["vocab_size"])).train()
    conf = ValidationConf(probes=True, probe_max_new_tokens=12, probe_smiles_samples=5,
                          probe_smiles_max_new_tokens=24, probe_batch_size=3)
    probes = ChemistryProbes(conf, shards, manifest, seed=11)
    cpu = torch.device("cpu")
    first = probes.run(model, cpu)
    assert model.training  # train mode is restored
    assert probes.run(model, cpu) == first
    assert first["formula_molecules"] == len(probes.records) and first["smiles_samples"] == 5

    def decode(batch_size: int, seed: int | None = None):
        probes.conf.probe_batch_size = batch_size
        if seed is None:
            return probes.generate(model.eval(), cpu, probes.formula_prompts, 12, probes.line_end_ids)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(5)]
        return probes.generate(model.eval(), cpu, [probes.smiles_prompt] * 5, 24, probes.special_ids,
                               generators=generators)

    greedy = decode(3)
    assert len(greedy) == len(probes.records) and all(len(ids) <= 12 for ids, _ in greedy)
    assert decode(1) == greedy  # right padding: a row's tokens do not depend on its batch
    sampled = decode(2, seed=5)
    assert decode(5, seed=5) == sampled and decode(2, seed=6) != sampled


def test_report_shows_the_probes_of_each_epoch(tmp_path):
    from pretrain.report import markdown, summarise

    rows = write_run(tmp_path, epochs=2, rounds_per_epoch=10)
    rounds = [r for r in rows if r.get("event") == "validation"]
    for k, r in enumerate(rounds):
        r["probes"] = {"formula_exact_match": k / len(rounds), "formula_molecules": 64,
                       "smiles_validity": 0.5, "smiles_samples": 16}
    summary = summarise(rows)
    ends = [next(r for r in rounds if r["tokens_seen"] == e["end_tokens"]) for e in summary["epochs"]]
    assert [e["probes_end"] for e in summary["epochs"]] == [r["probes"] for r in ends]
    md = markdown(summary, tmp_path)
    assert "| epoch | formula exact match (S2F) | SMILES validity |" in md
    assert f"| 2 | {ends[1]['probes']['formula_exact_match']:.3f} | 0.500 |" in md
