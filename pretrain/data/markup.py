"""Galactica markup: a record (one JSON object) → the document text, by its source's template.

Templates come from the corpus config (`conf/corpus/*.yaml`), see :class:`SourceFormat`. Formatters:
  smiles      `[START_I_SMILES]…[END_I_SMILES]` when isomeric (contains @, / or \\), else `[START_SMILES]…`
  amino       `[START_AMINO]…[END_AMINO]` (uppercase one-letter codes)
  dna         `[START_DNA]…[END_DNA]` (uppercase IUPAC nucleotides)
  properties  a JSON object as "key: value" lines
  cite        citations wrapped in `[START_REF]…[END_REF]`: in each match of the source's citation_regex,
              the first capturing group that took part (:func:`wrap_citations`)
  formula     a SMILES field → its molecular formula by RDKit's CalcMolFormula (Hill order, charge
              last: "C9H13NO2", "H4N+"); a SMILES RDKit cannot parse renders nothing, so its part is
              left out (the document is kept; the manifest counts these as `no_formula`)
Text fields are cleaned (:func:`clean_text`); `<work>` and markup already in the input are kept.
Every template field is a JSON string, except a `|properties` one: an object of strings, numbers or
booleans (:func:`check_field`; anything else is an `invalid_field` line).

:meth:`Renderer.formula_probe` gives the chemistry probe's view of a record (pretrain/evaluation/probes.py):
the document text up to its formula, and the formula itself.
"""
from __future__ import annotations

import functools
import re
import string
from typing import Any, Callable

from .clean import clean_sequence, clean_text
from .config import ConfigError, SourceFormat

FORMATTERS = (None, "smiles", "amino", "dna", "properties", "cite", "formula")

AMINO = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
DNA = set("ACGTUNRYKMSWBDHV")


class RecordError(ValueError):
    """A record that cannot be rendered: .reason is the counter key in the manifest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def json_type(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), "null")


def check_field(field: str, value: Any, formatter: str | None) -> None:
    """The type of a template field's value: a string; for `|properties`, an object without arrays or objects."""
    if formatter != "properties":
        if not isinstance(value, str):
            raise RecordError("invalid_field", f"field {field!r} is a JSON {json_type(value)}, not a string")
        return
    if not isinstance(value, dict):
        raise RecordError("invalid_field", f"field {field!r} is a JSON {json_type(value)}, not an object")
    for key, item in value.items():
        if isinstance(item, (list, dict)):
            raise RecordError("invalid_field", f"field {field!r}: property {key!r} is a JSON {json_type(item)}, "
                              "not a string or number")


def smiles_span(s: str) -> str:
    s = clean_sequence(s)
    if any(c in s for c in "@/\\"):
        return f"[START_I_SMILES]{s}[END_I_SMILES]"
    return f"[START_SMILES]{s}[END_SMILES]"


@functools.cache
def _rdkit():
    from rdkit import Chem, RDLogger
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    RDLogger.DisableLog("rdApp.*")  # a bad SMILES is an outcome here, not a message on stderr
    S = Chem.SanitizeFlags
    # the steps of RDKit's sanitization that decide whether a molecule parses and how many hydrogens each
    # atom has: kekulization gives every aromatic atom its valence; ring perception and re-aromatization
    # (which only mark atoms and bonds aromatic), radicals, conjugation, hybridization, chirality clean-up
    # and the removal of explicit hydrogens change no atom count, and were 55% of the time (the formulas of
    # all 51,040 molecules of the shared corpus are the same as with MolFromSmiles' full sanitization)
    ops = (S.SANITIZE_CLEANUP | S.SANITIZE_PROPERTIES | S.SANITIZE_KEKULIZE | S.SANITIZE_ADJUSTHS
           | S.SANITIZE_CLEANUP_ORGANOMETALLICS)
    return Chem, CalcMolFormula, ops


def molecular_formula(smiles: str) -> str | None:
    """RDKit's CalcMolFormula of a SMILES (isotopes folded into their element), None if it does not parse."""
    Chem, CalcMolFormula, ops = _rdkit()
    mol = Chem.MolFromSmiles(clean_sequence(smiles), sanitize=False)
    if mol is None:
        return None
    try:
        Chem.SanitizeMol(mol, ops)
    except Chem.MolSanitizeException:  # a valence or kekulization error: not a molecule
        return None
    return CalcMolFormula(mol)


def _sequence_span(alphabet: set[str], start: str, end: str) -> Callable[[str], str]:
    def span(s: str) -> str:
        s = clean_sequence(s).upper()
        bad = set(s) - alphabet
        if bad:
            raise RecordError("bad_sequence", f"characters {''.join(sorted(bad))!r} in a {start} sequence")
        return f"{start}{s}{end}"
    return span


class Renderer:
    """Renders records of every configured source; one per process (compiled templates, regexes)."""

    def __init__(self, formats: dict[str, SourceFormat], unicode_form: str = "NFKC"):
        self.formats = formats
        self.unicode_form = unicode_form
        self.parts = {name: [self._parse(p) for p in f.template] for name, f in formats.items()}
        for name, parts in self.parts.items():
            for literal, field, formatter in (piece for part in parts for piece in part):
                if formatter not in FORMATTERS:
                    raise ConfigError(f"corpus.{name}.template: unknown formatter {formatter!r} "
                                      f"(known: {', '.join(f for f in FORMATTERS if f)})")
        # sources whose documents carry a formula (their held-out records become probe records)
        self.formula_sources = {name for name, parts in self.parts.items()
                                if any(fmt == "formula" for part in parts for _, _, fmt in part)}
        self.citations = {name: re.compile(f.citation_regex, re.MULTILINE) if f.citation_regex else None
                          for name, f in formats.items()}

    @staticmethod
    def _parse(part: str) -> list[tuple[str, str | None, str | None]]:
        """'# {title}' → [('# ', 'title', None)]; '{smiles|smiles}' → [('', 'smiles', 'smiles')]."""
        out = []
        for literal, name, _spec, _conv in string.Formatter().parse(part):
            field, _, fmt = (name or "").partition("|") if name is not None else (None, "", "")
            out.append((literal, field if name is not None else None, fmt or None))
        return out

    def render(self, source: str, record: dict[str, Any]) -> str:
        return self.render_with_probe(source, record)[0]

    def formula_probe(self, source: str, record: dict[str, Any]) -> dict[str, str] | None:
        """{"prompt", "smiles", "formula"} of a record of a source with a `|formula` field, or None
        (another source, or a SMILES that RDKit cannot parse); see :meth:`render_with_probe`."""
        return self.render_with_probe(source, record)[1] if source in self.formula_sources else None

    def render_with_probe(self, source: str, record: dict[str, Any]) -> tuple[str, dict[str, str] | None]:
        """The document text, and its formula probe record (or None) from the same rendering.

        The probe's prompt is the rendered document up to the formula, its label included and trailing
        spaces left out ("aspirin\n\n[START_SMILES]…[END_SMILES]\n\nFormula:"): it ends on a word
        boundary of the tokenizer (a space starts the next word), so its tokens are a prefix of the document's.
        """
        pieces = self._pieces(source, record)
        text = "\n\n".join(t for t, _ in pieces)
        for k, (piece, at) in enumerate(pieces):
            if at is not None:
                start, end, field = at
                prompt = "\n\n".join([t for t, _ in pieces[:k]] + [piece[:start].rstrip(" ")])
                return text, {"prompt": prompt, "smiles": clean_sequence(str(record[field])),
                              "formula": piece[start:end]}
        return text, None

    def _pieces(self, source: str, record: dict[str, Any]) -> list[tuple[str, tuple[int, int, str] | None]]:
        """The rendered parts that are kept, each with (start, end, field) of its formula value, or None."""
        fmt = self.formats[source]
        for key in fmt.required:
            value = record.get(key)
            if value is None or (isinstance(value, str) and not value.strip()) or value == {}:
                reason = "missing_field" if key not in record else "empty_document"
                raise RecordError(reason, f"field {key!r} is {'missing' if key not in record else 'empty'}")
        pieces = []
        for part in self.parts[source]:
            text, at, size = [], None, 0
            for literal, field, formatter in part:
                text.append(literal)
                size += len(literal)
                if field is None:
                    continue
                value = record.get(field)
                if value is None or value == "" or value == {} or value == []:
                    break  # an absent optional field drops the whole part
                check_field(field, value, formatter)
                value = self._format(source, value, formatter)
                if not value:
                    break
                if formatter == "formula" and at is None:
                    at = (size, size + len(value), field)
                text.append(value)
                size += len(value)
            else:
                if "".join(text).strip():
                    pieces.append(("".join(text), at))
        return pieces

    def _format(self, source: str, value: Any, formatter: str | None) -> str:
        if formatter == "smiles":
            return smiles_span(str(value))
        if formatter == "formula":
            return molecular_formula(str(value)) or ""
        if formatter == "amino":
            return _sequence_span(AMINO, "[START_AMINO]", "[END_AMINO]")(str(value))
        if formatter == "dna":
            return _sequence_span(DNA, "[START_DNA]", "[END_DNA]")(str(value))
        if formatter == "properties":
            return "\n".join(f"{clean_text(str(k), self.unicode_form)}: {clean_text(str(v), self.unicode_form)}"
                             for k, v in value.items())
        text = clean_text(str(value), self.unicode_form)
        if formatter == "cite" and self.citations[source] is not None:
            text = wrap_citations(self.citations[source], text)
        return text


_REF_SPAN = re.compile(r"\[START_REF\].*?\[END_REF\]", re.DOTALL)


def _wrap_group(m: re.Match) -> str:
    """The match with its first participating group between [START_REF] and [END_REF]."""
    g = next((i for i in range(1, m.re.groups + 1) if m.group(i) is not None), None)
    if g is None:
        return m.group(0)
    start, end = m.start(g) - m.start(), m.end(g) - m.start()
    return f"{m.group(0)[:start]}[START_REF]{m.group(0)[start:end]}[END_REF]{m.group(0)[end:]}"


def wrap_citations(regex: re.Pattern, text: str) -> str:
    """Galactica's citation markup (arXiv 2211.09085, §3.1: "we wrap citations with special reference
    tokens [START_REF] and [END_REF]"): in every match of `regex`, the first capturing group that took
    part in the match is wrapped, so one regex can list several citation forms as alternatives, each
    with its own group. Text already inside [START_REF]…[END_REF] is left as it is."""
    if "[START_REF]" not in text:
        return regex.sub(_wrap_group, text)
    out, pos = [], 0
    for ref in _REF_SPAN.finditer(text):
        out += [regex.sub(_wrap_group, text[pos:ref.start()]), ref.group(0)]
        pos = ref.end()
    return "".join(out) + regex.sub(_wrap_group, text[pos:])
