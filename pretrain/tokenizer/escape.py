"""Span escaping for Hugging Face tokenizers of Galactica (standalone: stdlib only).

Inside `[START_SMILES]…[END_SMILES]`, `[START_I_SMILES]…[END_I_SMILES]`, `[START_AMINO]…[END_AMINO]`
and `[START_DNA]…[END_DNA]` every character is its own token. A Hugging Face tokenizer cannot know
that it is inside such a span, so text is escaped before encoding, as galai does for the released
checkpoints (paperswithcode/galai, galai/utils.py `escape_custom_split_sequence`, applied by
galai/model.py before every encode): SPLIT_MARKER goes before every character of a span and before
its end marker, and the tokenizer's `Split(SPLIT_MARKER, "removed")` pre-tokenizer (in the released
tokenizer.json, and in our export) takes it out again, which leaves each span character its own
pre-token:

    from transformers import AutoTokenizer
    from escape_spans import escape_spans          # this file, copied into the export folder
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(escape_spans(text))["input_ids"]      # == GalacticaTokenizer.encode(text)

`escape_spans` gives galai's exact string for every span without a line break. One difference: galai's
span regex has no DOTALL, so it leaves a span that holds a line break unescaped; here such a span is
escaped too, as our sentencepiece tokenizer splits it (gal-prepare never writes one: sequences lose
their whitespace in pretrain/data/clean.py `clean_sequence`). Prose needs no escaping; escaping text
without spans returns it unchanged.
"""
from __future__ import annotations

import re

SPLIT_MARKER = "SPL1T-TH1S-Pl3A5E"  # galai/utils.py SPLIT_MARKER, the marker the released tokenizer removes
SPAN_RE = re.compile(r"\[START_(I_SMILES|SMILES|AMINO|DNA)\](.*?)\[END_\1\]", re.DOTALL)


def _escape(match: re.Match) -> str:
    kind, content = match.group(1), match.group(2)
    return f"[START_{kind}]" + "".join(SPLIT_MARKER + c for c in content) + f"{SPLIT_MARKER}[END_{kind}]"


def escape_spans(text: str) -> str:
    """SPLIT_MARKER before every character of each SMILES / amino-acid / DNA span and before its end marker."""
    return SPAN_RE.sub(_escape, text)
