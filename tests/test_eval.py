"""gal-eval: lm-evaluation-harness on a trained run, with the project's tasks and tokenization.

A tiny model is trained on the built-in sample and evaluated with gal-eval. Its per-source held-out
loss must equal the one this project's own model computes on the same documents and windows, and a
SMILES-bearing document must tokenize in lm-eval to the ids the shards hold.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import events, run_cli, train, wandb_history

pytestmark = [pytest.mark.slow, pytest.mark.trainer]
LIMIT = 12  # documents per task


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """gal-prepare of the built-in sample (docstrings, molecules), 256-token samples."""
    out = tmp_path_factory.mktemp("eval") / "shards"
    run_cli("shards.seq_len=256", f"output={out}")
    return out


@pytest.fixture(scope="module")
def evaluated(shards, tmp_path_factory):
    """A 4-step run of tiny-2l (wandb offline), then `gal-eval RUN_DIR --limit 12` in this process."""
    from pretrain import eval as gal_eval

    run = tmp_path_factory.mktemp("eval") / "run"
    train(1, run, shards, "trainer.global_batch_tokens=1024", "optim.warmup_tokens=1024", "trainer.max_tokens=4096")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        scores = gal_eval.run(run, [], limit=LIMIT, batch_size=4)
    return run, scores


def project_nats_per_token(hf_dir, texts_and_tokens, eos: int) -> float:
    """The project's own model (model.hf.import_hf) on the same documents, in lm-eval's rolling windows."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from model.hf import import_hf

    model = import_hf(hf_dir).eval()
    nll, count = 0.0, 0
    for tokens in texts_and_tokens:
        windows = map(make_disjoint_window, get_rolling_token_windows(
            token_list=tokens, prefix_token=eos, max_seq_len=model.config.max_positions, context_len=1))
        for context, target in windows:
            ids = torch.tensor([context + target])
            with torch.no_grad():
                logp = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0, -len(target):]
            nll -= logp.gather(1, torch.tensor(target)[:, None]).sum().item()
            count += len(target)
    return nll / count


def test_heldout_loss_equals_the_projects_own_on_the_same_documents(evaluated, shards):
    run, scores = evaluated
    out = run / "eval" / "step00000004"
    manifest = json.loads((shards / "manifest.json").read_text())
    sources = sorted(s.split("/", 1)[1] for s in manifest["splits"] if s.startswith("valid/"))
    assert {f"gal_heldout_{s}" for s in sources} | {"gal_smiles_to_formula"} == set(scores)
    for source in sources:
        rows = [json.loads(x) for x in (out / "tasks/data" / f"gal_heldout_{source}.jsonl").read_text().splitlines()]
        assert len(rows) == LIMIT or source == "molecules"
        from pretrain.data.shards import ShardReader

        docs = dict(ShardReader(shards / "valid" / source).documents())
        tokens = [docs[r["id"]][:-1].tolist() for r in rows]  # the documents' own tokens (no trailing eos)
        assert [len(t) for t in tokens] == [r["n_tokens"] for r in rows]
        want = project_nats_per_token(out / "hf", tokens, manifest["eos_id"])
        assert scores[f"gal_heldout_{source}"]["nats_per_token"] == pytest.approx(want, abs=1e-4)
    assert 0.0 <= scores["gal_smiles_to_formula"]["formula_exact_match"] <= 1.0
    assert json.loads((out / "results.json").read_text())["scores"] == scores
    assert events(run, "lm_eval")[-1] == {"event": "lm_eval", "step": 4, "tokens_seen": 4096, "tag": "step00000004",
                                          "scores": scores}
    # and in the run's own (offline) wandb run, at the checkpoint's tokens_seen
    run_file = max(run.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    rows = [r for r in wandb_history(run_file) if "lm_eval/gal_heldout_docstrings/nats_per_token" in r]
    assert rows and rows[-1]["tokens_seen"] == 4096


def test_a_smiles_document_tokenizes_in_lm_eval_as_in_the_shards(evaluated, shards):
    from pretrain.data.shards import ShardReader
    from pretrain.evaluation.harness import GalacticaHarnessLM

    run, _ = evaluated
    out = run / "eval" / "step00000004"
    lm = GalacticaHarnessLM(pretrained=str(out / "hf"), device="cpu", dtype="float32", batch_size=1)
    docs = dict(ShardReader(shards / "valid" / "molecules").documents())
    rows = [json.loads(x) for x in (out / "tasks/data/gal_heldout_molecules.jsonl").read_text().splitlines()]
    assert all("SMILES]" in r["text"] for r in rows)
    for r in rows:
        assert lm.tok_encode(r["text"]) == docs[r["id"]][:-1].tolist(), r["id"]
    assert lm.prefix_token_id == 2  # documents start after </s>, as in the packed training data
    # the generation task's input is the SMILES alone (LlaSMol's), no name
    s2f = [json.loads(x) for x in (out / "tasks/data/gal_smiles_to_formula.jsonl").read_text().splitlines()]
    assert s2f and all(r["prompt"].startswith(("[START_SMILES]", "[START_I_SMILES]")) and r["prompt"].endswith("Formula:")
                       for r in s2f)
