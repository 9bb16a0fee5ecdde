"""The scoring functions of gal-eval's lm-eval task YAMLs (pretrain/evaluation/harness.py writes the
YAMLs and copies this file next to them as ``gal_tasks.py``; they name it with ``!function``)."""
from __future__ import annotations

from pretrain.evaluation.probes import formula_match


def heldout_results(doc: dict, results: list) -> dict:
    """A document's rolling log-likelihood (nats, summed) with its token count, for :func:`nats_per_token`."""
    return {"nats_per_token": (float(results[0]), int(doc["n_tokens"]))}


def nats_per_token(items: list[tuple[float, int]]) -> float:
    """The loss per token over all documents (token-weighted, as the training and validation loss)."""
    return -sum(ll for ll, _ in items) / max(sum(n for _, n in items), 1)


def formula_results(doc: dict, results: list) -> dict:
    """The generated formula line against the gold one, with LlaSMol's element-count rule."""
    return {"formula_exact_match": float(formula_match(results[0].strip(), doc["formula"]))}
