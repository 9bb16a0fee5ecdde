"""lm-evaluation-harness on this project's models: the model class gal-eval registers, and its tasks.

**The model** (``galactica``, a subclass of lm-eval's ``HFLM``) reads text the way training did:

* sequence spans are escaped first (:func:`pretrain.tokenizer.escape_spans`, galai's split marker), so a
  SMILES, protein or DNA span is one token per character, as in the shards; a plain ``hf`` model would
  tokenize it with the BPE merges (27 tokens instead of 30 on one molecule);
* a document starts after ``</s>``, where documents start in the packed training data: the prefix token
  of rolling log-likelihoods and of generation contexts is eos, never ``<s>`` (which training never sees).

**The tasks** are lm-eval task YAMLs that :func:`write_tasks` writes next to their data (so that they can
be rerun with ``lm_eval --include_path``), from a gal-prepare shard set:

* ``gal_heldout_<source>``: the held-out documents of ``valid/<source>`` (decoded from the shards),
  scored as rolling log-likelihoods; ``nats_per_token`` is the loss per token of the document's own
  tokens (the shards' count), the unit of the training and validation loss;
* ``gal_smiles_to_formula``: the chemistry probe's held-out molecules (``probes/<source>.jsonl``) with
  LlaSMol's input, the SMILES alone (no name): generate the formula line greedily and score it with
  LlaSMol's element-count rule (:func:`pretrain.evaluation.probes.formula_match`).

The scoring functions the YAMLs name (``!function gal_tasks.…``) are in
``pretrain/evaluation/lm_eval_tasks.py``, copied next to them.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import yaml
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from pretrain.data.shards import ShardReader
from pretrain.evaluation.probes import load_probe_records
from pretrain.tokenizer import escape_spans, load_tokenizer

TASKS_MODULE = Path(__file__).with_name("lm_eval_tasks.py")
SMILES_MARKERS = ("[START_I_SMILES]", "[START_SMILES]")


@register_model("galactica")
class GalacticaHarnessLM(HFLM):
    """lm-eval's HF causal LM with the project's tokenization: escaped spans, no ``<s>``, eos as prefix."""

    def __init__(self, pretrained, **kwargs):
        super().__init__(pretrained=pretrained, add_bos_token=False, **kwargs)
        self.custom_prefix_token_id = self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        return super().tok_encode(escape_spans(string), add_special_tokens=False, left_truncate_len=left_truncate_len)

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None,
                         truncation: bool = False):
        """Generation contexts: escaped, each after eos (left padding goes before it; OPT's positions
        follow the attention mask)."""
        ids, mask = super().tok_batch_encode([escape_spans(s) for s in strings], padding_side=padding_side,
                                             left_truncate_len=left_truncate_len, truncation=truncation)
        eos = torch.full((ids.shape[0], 1), self.prefix_token_id, dtype=ids.dtype)
        return torch.cat([eos, ids], dim=1), torch.cat([torch.ones_like(eos), mask], dim=1)


def write_tasks(data_path: str | Path, out_dir: str | Path, limit: int | None = None) -> list[str]:
    """The YAML tasks (and their JSONL data) of the shard set at ``data_path`` into ``out_dir``; returns the
    task names. ``limit``: at most that many documents per held-out source and molecules."""
    from pretrain.data.shards import read_manifest

    data_path, out_dir = Path(data_path), Path(out_dir)
    manifest = read_manifest(data_path)
    tok = load_tokenizer(data_path / manifest["tokenizer"]["model"])
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TASKS_MODULE, out_dir / "gal_tasks.py")
    names = []
    for split in sorted(s for s in manifest["splits"] if s.startswith("valid/")):
        source = split.split("/", 1)[1]
        rows = []
        for doc_id, tokens in ShardReader(data_path / manifest["splits"][split]["dir"]).documents():
            text_tokens = tokens[:-1] if tokens[-1] == tok.eos_id else tokens  # the eos the packer appended
            rows.append({"id": doc_id, "text": tok.decode(text_tokens.tolist()), "n_tokens": len(text_tokens)})
            if limit and len(rows) == limit:
                break
        names.append(_task(out_dir, f"gal_heldout_{source}", rows, {
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "process_results": "!function gal_tasks.heldout_results",
            "metric_list": [{"metric": "nats_per_token", "aggregation": "!function gal_tasks.nats_per_token",
                             "higher_is_better": False}]}))
    molecules = [r for r in load_probe_records(data_path, manifest) if r.get("formula")][:limit or None]
    if molecules:
        rows = [{"id": r["id"], "smiles": r["smiles"], "prompt": _smiles_alone(r["prompt"]), "formula": r["formula"]}
                for r in molecules]
        names.append(_task(out_dir, "gal_smiles_to_formula", rows, {
            "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{formula}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 48, "do_sample": False},
            "process_results": "!function gal_tasks.formula_results",
            "metric_list": [{"metric": "formula_exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    return names


def _smiles_alone(prompt: str) -> str:
    """The probe prompt from its SMILES span on (LlaSMol's input: no name): "[START_I_SMILES]…\\n\\nFormula:"."""
    start = min((i for i in (prompt.find(m) for m in SMILES_MARKERS) if i >= 0), default=0)
    return prompt[start:]


def _task(out_dir: Path, name: str, rows: list[dict], spec: dict) -> str:
    data = out_dir / "data" / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
              "test_split": "test", **spec}
    text = yaml.safe_dump(config, sort_keys=False)
    (out_dir / f"{name}.yaml").write_text(re.sub(r"'(!function [\w.]+)'", r"\1", text))  # the tag unquoted
    return name


def evaluate(hf_dir: str | Path, data_path: str | Path, out_dir: str | Path, tasks: list[str] | None = None,
             limit: int | None = None, batch_size: int = 8, device: str | None = None) -> dict:
    """Run the project's tasks (all, or ``tasks``) on the HF folder ``hf_dir``; returns
    ``{task: {metric: value}}`` and writes it, with lm-eval's whole result, to ``out_dir/results.json``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out_dir = Path(out_dir)
    names = write_tasks(data_path, out_dir / "tasks", limit=limit)
    chosen = [n for n in names if not tasks or n in tasks or n.removeprefix("gal_") in tasks]
    if tasks and not chosen:
        raise ValueError(f"none of the tasks {tasks} is one of {names}")
    lm = GalacticaHarnessLM(pretrained=str(hf_dir), batch_size=batch_size, dtype="float32",
                            device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = lm_eval.simple_evaluate(model=lm, tasks=chosen, task_manager=TaskManager(include_path=str(out_dir / "tasks")),
                                     log_samples=False)
    scores = {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
              for task, metrics in result["results"].items()}
    (out_dir / "results.json").write_text(json.dumps({"scores": scores, "lm_eval": result["results"],
                                                      "config": {"hf_dir": str(hf_dir), "data_path": str(data_path),
                                                                 "limit": limit}}, indent=2, default=str) + "\n")
    return scores
