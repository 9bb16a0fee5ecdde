"""Cleaning: Unicode and whitespace normalization that keeps Galactica's distinctions.

NFKC would fold `m²` into `m2` and `H₂O` into `H2O`. Galactica kept them apart by marking them up, so
runs of superscript / subscript characters become `[START_SUP]2[END_SUP]` / `[START_SUB]2[END_SUB]`
*before* normalization. Then: the chosen Unicode form (NFKC by default: ligatures, full-width and
compatibility characters folded), control and format characters removed (newline and tab kept),
other spaces made plain, runs of inner spaces collapsed (leading indentation kept, for code),
trailing spaces cut, at most one blank line in a row.
"""
from __future__ import annotations

import re
import unicodedata

SUPERSCRIPTS = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿⁱ", "0123456789+-=()ni"))
SUBSCRIPTS = dict(zip("₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎ₐₑₒₓₕₖₗₘₙₚₛₜ", "0123456789+-=()aeoxhklmnpst"))
_SUP_RUN = re.compile("[" + "".join(SUPERSCRIPTS) + "]+")
_SUB_RUN = re.compile("[" + "".join(SUBSCRIPTS) + "]+")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")
_TRAILING_SPACES = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")
# every Unicode control (Cc) and format (Cf) character except \t and \n, and the odd spaces
_REPLACE = {"Cc": None, "Cf": None, "Zs": " ", "Zl": " ", "Zp": " "}
_DROP = {c: _REPLACE[cat] for c, cat in ((c, unicodedata.category(chr(c))) for c in range(0x110000))
         if cat in _REPLACE and c not in (0x09, 0x0A, 0x20)}


def mark_scripts(text: str) -> str:
    """`x²` → `x[START_SUP]2[END_SUP]`, `H₂O` → `H[START_SUB]2[END_SUB]O`."""
    text = _SUP_RUN.sub(lambda m: "[START_SUP]" + "".join(SUPERSCRIPTS[c] for c in m.group()) + "[END_SUP]", text)
    return _SUB_RUN.sub(lambda m: "[START_SUB]" + "".join(SUBSCRIPTS[c] for c in m.group()) + "[END_SUB]", text)


def clean_text(text: str, unicode_form: str = "NFKC") -> str:
    if text.isascii() and text.isprintable() and "  " not in text:  # one plain line: nothing to do
        return text.rstrip()
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize(unicode_form, mark_scripts(text))
    text = text.translate(_DROP)
    text = _INNER_SPACES.sub(" ", text)
    text = _TRAILING_SPACES.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.rstrip().lstrip("\n")


def clean_sequence(seq: str) -> str:
    """SMILES, amino-acid and nucleotide strings: no whitespace at all (FASTA line breaks go)."""
    return "".join(seq.split())
