"""Deterministic choices by hash of the document id: held-out validation, tokenizer training sample.

A document's split depends on (salt, id) only, never on the other documents, so adding documents
never moves old ones between train and validation.
"""
from __future__ import annotations

import hashlib


def unit_hash(salt: str, doc_id: str) -> float:
    """A number in [0, 1), uniform over ids, fixed for (salt, id)."""
    digest = hashlib.blake2b(f"{salt}\x00{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_validation(doc_id: str, valid_fraction: float, salt: str) -> bool:
    return unit_hash(salt, doc_id) < valid_fraction
