"""Span escaping for the Hugging Face export of the Galactica tokenizer (standalone: stdlib only).

Inside `[START_SMILES]…[END_SMILES]`, `[START_I_SMILES]…[END_I_SMILES]`, `[START_AMINO]…[END_AMINO]`
and `[START_DNA]…[END_DNA]` every character is its own token. A plain Hugging Face tokenizer cannot
know that it is inside such a span, so, as in Galactica's released tokenizer, text is escaped before
encoding: `escape_spans` puts SPLIT_MARKER between the characters of each span, and the exported
tokenizer.json removes the marker in a `Split` pre-tokenizer (behavior "removed"), which leaves
each span character as its own pre-token:

    from transformers import AutoTokenizer
    from escape_spans import escape_spans          # this file, copied into the export folder
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(escape_spans(text))["input_ids"]      # == GalacticaTokenizer.encode(text)

Prose needs no escaping; escaping text without spans returns it unchanged.
"""
from __future__ import annotations

import re

SPLIT_MARKER = "SPL1T-TH1S-Pl3A5E"  # the marker Galactica's own release used
SPAN_RE = re.compile(r"\[START_(I_SMILES|SMILES|AMINO|DNA)\](.*?)\[END_\1\]", re.DOTALL)


def _escape(match: re.Match) -> str:
    kind, content = match.group(1), match.group(2)
    return f"[START_{kind}]{SPLIT_MARKER.join(content)}[END_{kind}]"


def escape_spans(text: str) -> str:
    """Insert SPLIT_MARKER between the characters of every SMILES / amino-acid / DNA span."""
    return SPAN_RE.sub(_escape, text)
