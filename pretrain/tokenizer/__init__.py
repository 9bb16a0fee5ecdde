"""Galactica tokenizer: sentencepiece BPE with Galactica markup, and its Hugging Face export.

    tok = GalacticaTokenizer.train(texts, out_dir, vocab_size=50000)   # or GalacticaTokenizer.load(out_dir)
    ids = tok.encode("[START_I_SMILES]C(C(=O)O)N[END_I_SMILES] melts at 233 °C")
    tok.export_hf("hf_tokenizer/")   # AutoTokenizer folder; span text needs escape_spans(text) first
"""
from .escape import SPLIT_MARKER, escape_spans
from .tokenizer import GalacticaTokenizer
from .vocab import CONTROL_TOKENS, GALACTICA_TOKENS, SPECIAL_TOKENS

__all__ = ["GalacticaTokenizer", "SPECIAL_TOKENS", "CONTROL_TOKENS", "GALACTICA_TOKENS",
           "SPLIT_MARKER", "escape_spans"]
