"""Chemistry probes in the validation rounds: does the model know chemistry, beyond its loss?

* **SMILES → formula (S2F)**: on held-out molecules (``probes/molecules.jsonl`` of the shards, written
  by gal-prepare: the document text up to "Formula:" in the corpus' own template, and the gold
  formula, RDKit's ``CalcMolFormula``), greedy-decode the rest of the line and score it with
  LlaSMol's formula rule (:func:`formula_match`). Reported as ``formula_exact_match``.
* **SMILES validity**: sample continuations after ``[START_I_SMILES]`` at temperature 1, cut at
  ``[END_I_SMILES]``, and report the fraction RDKit parses (``smiles_validity``). A sample that
  ends in another special token or does not close within ``probe_smiles_max_new_tokens`` is invalid.

Both prompts start after ``</s>``, where a document starts in the packed training data. Decoding is
batched with right padding (causal attention: a row's next token never sees the padding after it)
and has no KV cache: each new token is one forward of the whole batch, which is cheap next to a
validation round for the default sizes (64 prompts × ≤ 48 tokens, 16 samples × ≤ 128 tokens).

Parallelism as in :class:`pretrain.evaluation.validation.Validator`: the model is called through the DeepSpeed
engine (ZeRO-3 gathers the parameters), its logits are gathered over tensor-parallel ranks (so every
TP rank picks the same token), prompts and samples are split over data-parallel ranks, every DP rank
runs the same number of forwards (a batch goes on while any rank's batch has an unfinished row) and
the counts are all-reduced. Sample ``i`` draws from its own ``torch.Generator`` seeded by
(``data.seed``, i), so the numbers are the same in every round for the same weights and do not
depend on how the samples are spread over ranks (up to the batch shape's float rounding).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pretrain.config import ConfigError, ValidationConf
from pretrain.data.loader import PROBE_MOLECULE_STREAM
from pretrain.evaluation import lockstep
from pretrain.tokenizer import load_tokenizer

SAMPLE_SEED_STRIDE = 1_000_003  # SMILES sample i of data seed s draws from torch.Generator(s * stride + i)

# ----------------------------------------------------------------------------- the scoring rules
_FORMULA_RE = re.compile(r"((?:[A-Z][a-z]?\d*)+)([+-]\d*)?")
_ELEMENT_RE = re.compile(r"([A-Z][a-z]?)(\d*)")


def formula_counts(formula: str) -> dict[str, int] | None:
    """Element counts of a molecular formula ("C2H6O" → {"C": 2, "H": 6, "O": 1}), or None if it is
    not one. A trailing charge counts as a pseudo-element: "H4N+" → {"H": 4, "N": 1, "+": 1}.

    LlaSMol's rule (Yu et al. 2024, arXiv 2402.09391, `utils/metrics.py` `parse_molecule` in
    github.com/OSU-NLP-Group/LLM4Chem): element symbols ``[A-Z][a-z]?`` with optional counts, a
    repeated element adds up ("CH3CH3" = C2H6), an optional charge ``[+-]\\d*`` at the end, nothing
    else (no parentheses, no isotope labels: RDKit's CalcMolFormula folds isotopes into their
    element by default, so the gold has none). Stricter than LlaSMol's regex in two corners
    it lets through: a string must start with a capital letter, and carry at most one charge.
    """
    m = _FORMULA_RE.fullmatch(formula.strip())
    if m is None:
        return None
    counts: Counter = Counter()
    for symbol, n in _ELEMENT_RE.findall(m.group(1)):
        counts[symbol] += int(n) if n else 1
    if m.group(2):
        counts[m.group(2)[0]] = int(m.group(2)[1:] or 1)
    return dict(counts)


def formula_match(predicted: str, gold: str) -> bool:
    """LlaSMol's S2F "exact match" (their `element_match`): the same element counts, in any order.
    A prediction that is not a formula never matches."""
    pred, ref = formula_counts(predicted), formula_counts(gold)
    if ref is None:
        raise ValueError(f"gold formula {gold!r} is not a molecular formula")
    return pred == ref


def smiles_valid(smiles: str) -> bool:
    """RDKit parses it (and it is not empty: RDKit turns "" into an empty molecule)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    return bool(smiles) and Chem.MolFromSmiles(smiles) is not None


# ----------------------------------------------------------------------------- the probes
def load_probe_records(data_path: Path, manifest: dict) -> list[dict]:
    """The held-out probe records gal-prepare listed in the manifest (id, prompt, smiles, formula)."""
    records = []
    for _, entry in sorted(manifest.get("probes", {}).items()):
        with open(Path(data_path) / entry["path"]) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


class ChemistryProbes:
    """Loaded once per run; :meth:`run` evaluates both probes on every rank and returns the same dict."""

    def __init__(self, conf: ValidationConf, data_path: Path, manifest: dict, *, seed: int):
        self.conf, self.seed = conf, seed
        if "model" not in manifest.get("tokenizer", {}):
            raise ConfigError(f"validation.probes=true needs the run's tokenizer, but {Path(data_path) / 'manifest.json'} "
                              "names none (prepare the shards with gal-prepare, or set validation.probes=false)")
        tok = load_tokenizer(Path(data_path) / manifest["tokenizer"]["model"])  # ours, or tokenizer.from_hf's
        self.tokenizer, self.eos_id, self.pad_id = tok, tok.eos_id, tok.pad_id
        records = load_probe_records(data_path, manifest)
        if len(records) > conf.probe_molecules:  # a fixed random subset, like the `seen` probe
            keep = np.random.default_rng([seed, PROBE_MOLECULE_STREAM]).choice(len(records), conf.probe_molecules, replace=False)
            records = [records[i] for i in sorted(keep)]
        self.records = records
        self.formula_prompts = [[self.eos_id] + tok.encode(r["prompt"]) for r in records]
        self.smiles_prompt = [self.eos_id, tok.piece_to_id("[START_I_SMILES]")]
        self.end_smiles_id = tok.piece_to_id("[END_I_SMILES]")
        # the formula's line ends at a token holding a newline, or at a special token (</s>, markers)
        self.special_ids = set(tok.special_ids.values())
        self.line_end_ids = self.special_ids | {i for i in range(tok.vocab_size) if "\n" in tok.decode([i])}

    @torch.no_grad()
    def run(self, engine, device) -> dict:
        """Both probes with `engine` (the DeepSpeed engine; in one process the bare GalacticaLM will do):
        {"formula_exact_match", "formula_molecules", "smiles_validity", "smiles_samples"}."""
        conf = self.conf
        with lockstep.eval_mode(engine):
            mine = lockstep.share(range(len(self.records)))
            lines = self.generate(engine, device, [self.formula_prompts[i] for i in mine], conf.probe_max_new_tokens,
                                  self.line_end_ids, total=len(self.records))
            correct = 0
            for i, (ids, stop) in zip(mine, lines):
                # a piece may hold the end of the formula and the newline ("O\n"): keep what is before it
                text = self.tokenizer.decode(ids + ([stop] if stop not in self.special_ids and stop is not None else []))
                correct += formula_match(text.split("\n")[0], self.records[i]["formula"])

            mine = lockstep.share(range(conf.probe_smiles_samples))
            generators = [torch.Generator().manual_seed(self.seed * SAMPLE_SEED_STRIDE + i) for i in mine]
            samples = self.generate(engine, device, [self.smiles_prompt] * len(mine), conf.probe_smiles_max_new_tokens,
                                    self.special_ids, generators=generators, total=conf.probe_smiles_samples)
            valid = sum(stop == self.end_smiles_id and smiles_valid(self.tokenizer.decode(ids)) for ids, stop in samples)

        counts = lockstep.sum_over_ranks(torch.tensor([correct, len(lines), valid, len(samples)]), device)
        correct, n, valid, k = counts.tolist()
        return {"formula_exact_match": correct / n if n else None, "formula_molecules": int(n),
                "smiles_validity": valid / k if k else None, "smiles_samples": int(k)}

    @torch.no_grad()
    def generate(self, engine, device, prompts: list[list[int]], max_new: int, stop_ids: set[int], *,
                 generators: list[torch.Generator] | None = None, total: int | None = None,
                 ) -> list[tuple[list[int], int | None]]:
        """Decode each prompt until a token in `stop_ids` or `max_new` tokens: [(new ids, stop id or None)].

        Greedy without `generators`, else row r samples with generators[r]. `total` is the number of
        prompts over all DP ranks (default: this rank's): every rank runs ceil(total / dp / batch)
        batches, each until no rank has an unfinished row, so ZeRO-3's collective gathers stay in step.
        """
        bs = self.conf.probe_batch_size
        total = len(prompts) if total is None else total
        room = getattr(engine, "module", engine).config.max_positions - max_new  # long prompts keep their end
        prompts = [p[-room:] for p in prompts]
        out: list[tuple[list[int], int | None]] = []
        for j in range(lockstep.rounds(total, bs)):
            chunk = prompts[j * bs:(j + 1) * bs]
            real = len(chunk)
            rows = chunk or [self.smiles_prompt]  # a rank with nothing left still takes part
            lengths = torch.tensor([len(p) for p in rows])
            buf = torch.full((len(rows), int(lengths.max()) + max_new), self.pad_id, dtype=torch.long)
            for r, p in enumerate(rows):
                buf[r, :len(p)] = torch.tensor(p)
            new: list[list[int]] = [[] for _ in rows]
            stop: list[int | None] = [None] * len(rows)
            done = [r >= real for r in range(len(rows))]
            for _ in range(max_new):
                logits = engine(buf[:, :int(lengths.max())].to(device))  # (rows, seq, vocab), gathered over TP
                last = logits[torch.arange(len(rows), device=logits.device), (lengths - 1).to(logits.device)].float()
                if generators is None:
                    picks = last.argmax(-1).tolist()
                else:
                    probs = torch.softmax(last, -1).cpu()
                    picks = [int(torch.multinomial(probs[r], 1, generator=generators[j * bs + r])) if r < real else 0
                             for r in range(len(rows))]
                for r, t in enumerate(picks):
                    if done[r]:
                        continue
                    if t in stop_ids:
                        done[r], stop[r] = True, t
                        continue
                    new[r].append(t)
                    buf[r, lengths[r]] = t
                    lengths[r] += 1
                    done[r] = len(new[r]) == max_new
                if not lockstep.any_rank(not all(done), device):
                    break
            out += list(zip(new, stop))[:real]
        return out
