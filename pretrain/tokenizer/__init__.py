"""Galactica tokenizers: our own sentencepiece BPE with Galactica markup (and its Hugging Face export),
or an existing Hugging Face tokenizer.json such as a released Galactica's.

    tok = GalacticaTokenizer.train(texts, out_dir, vocab_size=50000)   # or GalacticaTokenizer.load(out_dir)
    ids = tok.encode("[START_I_SMILES]C(C(=O)O)N[END_I_SMILES] melts at 233 °C")
    tok.export_hf("hf_tokenizer/")   # AutoTokenizer folder; span text needs escape_spans(text) first
    tok = HFTokenizer.load("galactica-1.3b/")   # the same interface (encode_batch, special_ids, sha256, ...)
    tok = load_tokenizer(path)                  # either kind, by its file
"""
from __future__ import annotations

from pathlib import Path

from .escape import SPLIT_MARKER, escape_spans
from .from_hf import HFTokenizer
from .tokenizer import GalacticaTokenizer
from .vocab import CONTROL_TOKENS, GALACTICA_TOKENS, HF_FILE, MODEL_FILE, SPECIAL_TOKENS

__all__ = ["GalacticaTokenizer", "HFTokenizer", "load_tokenizer", "SPECIAL_TOKENS", "CONTROL_TOKENS",
           "GALACTICA_TOKENS", "SPLIT_MARKER", "escape_spans"]


def load_tokenizer(path: str | Path) -> GalacticaTokenizer | HFTokenizer:
    """A tokenizer file (tokenizer.model: ours; tokenizer.json: Hugging Face), or a folder holding one
    (tokenizer.model first: our export folders hold both). A shard set's manifest names its file
    (manifest["tokenizer"]["model"])."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE if (path / MODEL_FILE).is_file() else path / HF_FILE
    if path.name.endswith(".json"):
        return HFTokenizer.load(path)
    return GalacticaTokenizer.load(path)
