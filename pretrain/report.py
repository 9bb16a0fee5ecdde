"""``gal-report RUN_DIR``: the validation curves of a run, epoch by epoch, and what repetition did.
``gal-report SWEEP_DIR`` (a Hydra multirun): the sweep's final held-out loss along its swept key
(pretrain/analysis/sweep.py).

Reads ``RUN_DIR/metrics.jsonl`` (a finished or a still-running run; a half-written last line is
skipped) and writes to ``RUN_DIR/report/`` (or ``--out DIR``):

* ``double_descent.png`` (pretrain/analysis/curves.py): the training loss with the held-out and seen
  losses against tokens seen, then each source's held-out and seen loss on its own scale against epochs,
  with epoch boundaries and the events found by :mod:`pretrain.analysis.doubledescent` (bump peaks ▲,
  overfitting onsets ✕). A run without validation rows gets its training curve;
* ``summary.json`` and ``summary.md``: the training loss in brief; per epoch the aggregate held-out loss
  at its start, end and minimum, the generalisation gap (aggregate held-out minus seen loss at the
  epoch's last round), the detected shape and events, the repeat count, and the effective data.

Effective data follows Muennighoff et al. 2023, "Scaling Data-Constrained Language Models":
``D' = U_D + U_D * R*_D * (1 - exp(-R_D / R*_D))`` with ``U_D`` the unique tokens (the training set
size, one epoch), ``R_D`` the repetitions (epochs - 1) and ``R*_D = 15.4`` as fitted in that paper;
the value of repeated tokens decays exponentially, so D' tends to U_D * (1 + R*_D) ≈ 16.4 U_D.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from pretrain.analysis import curves, doubledescent, sweep
from pretrain.cli import fail
from pretrain.analysis.records import read_metrics

R_STAR_D = 15.4  # Muennighoff et al. 2023, fitted R*_D
EFFECTIVE_DATA_FORMULA = "D' = U_D + U_D * R*_D * (1 - exp(-R_D / R*_D)), R*_D = 15.4 (Muennighoff et al. 2023)"


def effective_tokens(tokens_seen: float, unique_tokens: float, r_star: float = R_STAR_D) -> float:
    """Muennighoff et al.'s effective data D' after ``tokens_seen`` tokens of a ``unique_tokens`` set."""
    u = min(tokens_seen, unique_tokens)
    repeats = max(tokens_seen / unique_tokens - 1.0, 0.0)
    return u + u * r_star * (1.0 - math.exp(-repeats / r_star))


def load(metrics_path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; an error unless it has a training step or a validation round (a run
    without validation rows still gets its training curve)."""
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: no such metrics file (is RUN_DIR a run directory?)")
    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path}: empty, no rows yet")
    if not any(r.get("event") in (None, "validation") for r in rows):
        raise ValueError(f"{metrics_path}: no training step or validation round yet")
    return rows


def _tokens_per_epoch(rows: list[dict]) -> float:
    ratios = [r["tokens_seen"] / r["epoch"] for r in rows
              if isinstance(r.get("epoch"), (int, float)) and r.get("epoch", 0) > 0 and r.get("tokens_seen")
              and (r.get("event") is None or r.get("event") == "validation")]
    if not ratios:
        raise ValueError("metrics.jsonl: no training step yet (no row with both tokens_seen and a positive epoch)")
    return float(np.median(ratios))


def summarise(rows: list[dict], config: doubledescent.DetectConfig | None = None) -> dict:
    """The summary.json content: per epoch of the aggregate curve, and every series' detection."""
    valid = [r for r in rows if r.get("event") == "validation"]
    series = sorted({k for r in valid for k in r["losses"] if not k.startswith("seen")}, key=lambda k: (k == "aggregate", k))
    results = {s: doubledescent.from_metrics(rows, s, config) for s in series}
    unique = _tokens_per_epoch(rows)
    base = {"unique_tokens": unique, "effective_data_formula": EFFECTIVE_DATA_FORMULA, "r_star_d": R_STAR_D,
            "training_loss": _training_loss(rows)}
    if not results:  # no held-out rounds (validation off, or only seen sets): the training curve alone
        return {**base, "series": None, "noise": None, "epochs": [], "overfitting_epoch": None,
                "overfitting_onset_tokens": None, "detection": {}}
    main = "aggregate" if "aggregate" in results else series[0]
    epochs = []
    for e in results[main].epochs:
        last = next(r for r in reversed(valid) if r["tokens_seen"] == e.end_tokens and main in r["losses"])
        seen_end = last["losses"].get("seen")
        held_end = last["losses"][main]
        tokens_end = e.end_tokens
        epochs.append({
            "epoch": e.epoch, "repeat": e.epoch - 1, "complete": e.complete, "rounds": e.n_points,
            "start_tokens": e.start_tokens, "end_tokens": tokens_end,
            "loss_start": e.loss_start, "loss_end": e.loss_end, "loss_min": e.loss_min,
            "loss_min_tokens": e.loss_min_tokens, "seen_loss_end": seen_end,
            "gap_end": None if seen_end is None or held_end is None else held_end - seen_end,
            "shape": e.shape,
            "bump": None if e.bump_peak_tokens is None else {
                "min_tokens": e.bump_min_tokens, "peak_tokens": e.bump_peak_tokens,
                "recovery_tokens": e.bump_recovery_tokens, "size_noise": e.bump_noise,
                "recovery_noise": e.recovery_noise},
            "overfitting_onset_tokens": e.overfitting_onset_tokens,
            "effective_tokens": effective_tokens(tokens_end, unique),
            "effective_fraction": effective_tokens(tokens_end, unique) / tokens_end if tokens_end else None,
            "shapes_by_source": {s: next((x.shape for x in r.epochs if x.epoch == e.epoch), None)
                                 for s, r in results.items() if s != main},
            "probes_end": last.get("probes"),  # the chemistry probes of the epoch's last round (pretrain/evaluation/probes.py)
        })
    return {**base, "series": main, "noise": results[main].noise, "epochs": epochs,
            "overfitting_epoch": results[main].overfitting_epoch,
            "overfitting_onset_tokens": results[main].overfitting_onset_tokens,
            "detection": {s: r.to_dict() for s, r in results.items()}}


def _training_loss(rows: list[dict]) -> dict | None:
    """The training loss in brief: steps logged, first, last and lowest loss (None without step rows)."""
    losses = [r["loss"] for r in rows if "event" not in r and isinstance(r.get("loss"), (int, float))
              and math.isfinite(r["loss"])]
    if not losses:
        return None
    return {"steps_logged": len(losses), "first": losses[0], "last": losses[-1], "min": min(losses)}


def markdown(summary: dict, run_dir: Path) -> str:
    def f(v, fmt=".4f"):
        return "–" if v is None else format(v, fmt)

    train = summary.get("training_loss")
    head = [f"# Validation report: `{run_dir}`", ""]
    if train:
        head += [f"Training loss: {f(train['first'])} at the first logged step, {f(train['last'])} at the last "
                 f"({train['steps_logged']} steps logged; lowest {f(train['min'])}).", ""]
    if summary["series"] is None:
        return "\n".join(head + ["No held-out validation rounds in metrics.jsonl (validation.enabled=false, or no "
                                 "round yet): the figure shows the training loss only.", ""])
    lines = [*head,
             f"Series: `{summary['series']}` (token-weighted over held-out sources); unique training tokens "
             f"U_D = {summary['unique_tokens']:,.0f}; noise sigma = {summary['noise']:.4g} (loss units).", "",
             f"Effective data (Muennighoff et al. 2023, \"Scaling Data-Constrained Language Models\"): "
             f"`{summary['effective_data_formula']}`, with R_D = epochs - 1 at the end of each epoch.", "",
             "| epoch | repeat | rounds | loss start | loss end | loss min | seen end | gap end | shape | "
             "bump (min → peak → recovery, tokens; size in sigma) | overfitting onset | effective tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary["epochs"]:
        b = e["bump"]
        start = "boundary" if b is None or b["min_tokens"] is None else f"{b['min_tokens']:,}"
        bump = "–" if b is None else (f"{start} → {b['peak_tokens']:,} → {b['recovery_tokens']:,}; "
                                      f"{b['size_noise']:.1f}σ")
        onset = "–" if e["overfitting_onset_tokens"] is None else f"{e['overfitting_onset_tokens']:,}"
        lines.append(f"| {e['epoch']}{'' if e['complete'] else ' (running)'} | {e['repeat']} | {e['rounds']} | "
                     f"{f(e['loss_start'])} | {f(e['loss_end'])} | {f(e['loss_min'])} | {f(e['seen_loss_end'])} | "
                     f"{f(e['gap_end'])} | {e['shape']} | {bump} | {onset} | {e['effective_tokens']:,.0f} |")
    if summary.get("overfitting_epoch") is not None:
        lines += ["", f"**Overfitting across epochs**: the held-out loss was lowest at the end of epoch "
                  f"{summary['overfitting_epoch']} ({summary['overfitting_onset_tokens']:,} tokens) and has risen "
                  "significantly since, while the seen loss kept falling."]
    else:
        lines += ["", "No overfitting across epochs (epoch-end held-out losses: no significant rise above their "
                  "minimum while the seen loss falls)."]
    if any(e.get("probes_end") for e in summary["epochs"]):
        lines += ["", "Chemistry probes at each epoch's last round (`pretrain/evaluation/probes.py`):", "",
                  "| epoch | formula exact match (S2F) | SMILES validity |", "|---|---|---|"]
        for e in summary["epochs"]:
            p = e.get("probes_end") or {}
            lines.append(f"| {e['epoch']} | {f(p.get('formula_exact_match'), '.3f')} | "
                         f"{f(p.get('smiles_validity'), '.3f')} |")
    sources = [s for s in summary["detection"] if s != summary["series"]]
    if sources:
        lines += ["", "Shape per source and epoch:", "", "| source | " + " | ".join(
            str(e["epoch"]) for e in summary["epochs"]) + " |", "|---|" + "---|" * len(summary["epochs"])]
        for s in sources:
            shapes = {x["epoch"]: x["shape"] for x in summary["detection"][s]["epochs"]}
            lines.append(f"| {s} | " + " | ".join(shapes.get(e["epoch"], "–") for e in summary["epochs"]) + " |")
    lines += ["", "Shapes and events are defined in `pretrain/analysis/doubledescent.py` (thresholds: "
              + ", ".join(f"{k}={v}" for k, v in next(iter(summary["detection"].values()))["config"].items()) + ").", ""]
    return "\n".join(lines)


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    """Save the report figure (pretrain/analysis/curves.py) as a PNG."""
    import matplotlib.pyplot as plt

    fig = curves.figure(rows, summary)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(run_dir: str | Path, out_dir: str | Path | None = None,
           config: doubledescent.DetectConfig | None = None) -> dict[str, Path]:
    """Write the PNG and the summaries; returns their paths."""
    run_dir = Path(run_dir)
    rows = load(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows, config)
    paths = {"png": out / "double_descent.png", "json": out / "summary.json", "md": out / "summary.md"}
    paths["json"].write_text(json.dumps(summary, indent=1) + "\n")
    paths["md"].write_text(markdown(summary, run_dir))
    plot(rows, summary, paths["png"])
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gal-report", description="Validation curves of a run per epoch (double descent, "
                                "overfitting, effective data): double_descent.png, summary.json, summary.md. On a "
                                "sweep directory (gal-train -m ...): the final held-out loss along the swept key "
                                "(pretrain/analysis/sweep.py): sweep.png, summary.json, summary.md.")
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl, or a multirun directory of them")
    p.add_argument("--out", help="output directory (default RUN_DIR/report)")
    p.add_argument("--axis", help="a sweep's axis: the swept key (default: the one key that differs between points)")
    p.add_argument("--min-bump-noise", type=float, default=doubledescent.DetectConfig.min_bump_noise,
                   help="a rise counts if at least this many noise sigmas (see pretrain/analysis/doubledescent.py)")
    p.add_argument("--smooth-points", type=int, default=doubledescent.DetectConfig.smooth_points,
                   help="moving-average window in validation rounds (odd; default: from the rounds an epoch)")
    a = p.parse_args(argv)
    try:
        if sweep.is_sweep_dir(Path(a.run_dir)):
            paths = sweep.report(Path(a.run_dir), a.out and Path(a.out), a.axis)
        else:
            config = doubledescent.DetectConfig(min_bump_noise=a.min_bump_noise, smooth_points=a.smooth_points)
            paths = report(a.run_dir, a.out, config)
    except (FileNotFoundError, ValueError) as e:
        fail("gal-report", str(e))
    for kind, path in paths.items():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
