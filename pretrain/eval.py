"""gal-eval: lm-evaluation-harness on a run's checkpoint or a Hugging Face folder, with the project's tasks.

    gal-eval RUN_DIR                          # the latest checkpoint: exported, then every task
    gal-eval RUN_DIR heldout_arxiv smiles_to_formula --limit 200 --tag step00000042
    gal-eval HF_DIR --data /data/shards       # a gal-export folder (or a released Galactica's)

The tasks (pretrain/evaluation/harness.py): held-out loss per source (``gal_heldout_<source>``, in nats
per token, as training logs it) and SMILES → formula (``gal_smiles_to_formula``), from the shard set.
They are written as lm-eval task YAMLs under ``OUT/tasks``. The model is lm-eval's HF model with the
project's tokenization (escaped sequence spans, documents after ``</s>``).

Results go to ``OUT/results.json`` (OUT: ``RUN_DIR/eval/<tag>``, or ``HF_DIR/eval``) and, for a run, to
its ``metrics.jsonl`` as an ``lm_eval`` event at the checkpoint's step, and to its wandb run when it logs to wandb.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretrain.cli import fail, quiet_third_party
from pretrain.config import ConfigError


def run(target: str | Path, tasks: list[str], data: str | None = None, out: str | None = None,
        tag: str | None = None, limit: int | None = None, batch_size: int = 8) -> dict:
    """Evaluate ``target`` (a run directory or an HF folder); returns ``{task: {metric: value}}``."""
    from pretrain import export
    from pretrain.evaluation.harness import evaluate

    target = Path(target)
    if (target / "config.yaml").is_file() and (target / "checkpoints").is_dir():
        tag_dir = export.find_checkpoint(target, tag)
        out_dir = Path(out) if out else target / "eval" / tag_dir.name
        hf_dir = export.export(target, out_dir / "hf", tag=tag_dir.name, overwrite=True)
        data_path = Path(data) if data else export.find_data_path(export.load_run_config(target).data.path, target,
                                                                  required=True)
    elif (target / "config.json").is_file():
        if data is None:
            raise ConfigError(f"{target} is a Hugging Face folder: give the shard set its tasks come from (--data)")
        hf_dir, data_path, out_dir, tag_dir = target, Path(data), Path(out) if out else target / "eval", None
    else:
        raise ConfigError(f"{target}: neither a gal-train run directory (config.yaml, checkpoints/) nor a Hugging "
                          "Face folder (config.json)")
    try:
        scores = evaluate(hf_dir, data_path, out_dir, tasks=tasks, limit=limit, batch_size=batch_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if tag_dir is not None:
        record_in_run(target, tag_dir, scores)
    for task, metrics in scores.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"results: {out_dir / 'results.json'}")
    return scores


def record_in_run(run_dir: Path, tag_dir: Path, scores: dict) -> None:
    """The scores as an ``lm_eval`` event in the run's metrics.jsonl and, when the run logs to wandb, in its
    wandb run (resumed: ``lm_eval/<task>/<metric>`` at the checkpoint's tokens_seen, and the summary)."""
    from dataclasses import asdict

    from pretrain import export
    from pretrain.analysis.records import read_metrics
    from pretrain.trainer.metrics import init_wandb

    saved = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "checkpoint" and r.get("tag") == tag_dir.name]
    state = saved[-1] if saved else {"step": int(tag_dir.name.removeprefix("step")), "tokens_seen": None}
    event = {"event": "lm_eval", "step": state["step"], "tokens_seen": state["tokens_seen"], "tag": tag_dir.name,
             "scores": scores}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")
    cfg = export.load_run_config(run_dir)
    if cfg.logger.wandb and (run := init_wandb(run_dir, asdict(cfg), cfg.logger)) is not None:
        run.log({"tokens_seen": state["tokens_seen"],
                 **{f"lm_eval/{task}/{k}": v for task, metrics in scores.items() for k, v in metrics.items()}})
        run.summary["lm_eval/last"] = event
        run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gal-eval", description="lm-evaluation-harness on a gal-train run's "
                                     "checkpoint or a Hugging Face folder, with the project's tasks.")
    parser.add_argument("target", help="a gal-train run directory, or a Hugging Face OPTForCausalLM folder")
    parser.add_argument("tasks", nargs="*", help="task names, with or without the gal_ prefix (default: all): "
                        "heldout_<source>, smiles_to_formula")
    parser.add_argument("--data", help="the gal-prepare shard set (default: the run's data.path)")
    parser.add_argument("--out", help="where tasks and results go (default: RUN_DIR/eval/<tag> or HF_DIR/eval)")
    parser.add_argument("--tag", help="checkpoint tag of a run (default: the latest complete one)")
    parser.add_argument("--limit", type=int, help="at most this many documents per task")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    quiet_third_party()
    try:
        run(args.target, args.tasks, data=args.data, out=args.out, tag=args.tag, limit=args.limit,
            batch_size=args.batch_size)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        fail("gal-eval", str(e))


if __name__ == "__main__":
    main()
