"""Double descent along a sweep axis: the final held-out loss of a Hydra multirun against its swept key.

Hernandez et al. 2022 ("Scaling Laws and Interpretability of Learning from Repeated Data") found the
damage of repeated data non-monotone in the repetition count: the test loss rises with repetitions,
peaks where the repeated subset can just be memorised, and falls again. So a sweep's verdict is about
the shape of ``final loss(x)`` over the swept key ``x``, not about one run's curve over time.

A *sweep directory* is what ``gal-train -m KEY=a,b,c`` writes (conf/config.yaml: ``${run_dir}/<job
number>/``): one run directory per point, each with ``metrics.jsonl`` and Hydra's
``.hydra/overrides.yaml``. The swept keys are the overrides whose values differ between points. The
axis may also be a field of the points' last step row (``--axis repeated_passes``: how often a repeated
subset was seen, whatever its size and the run's length; ``source_epochs.arxiv`` for a nested one).

Definitions (:func:`detect_axis`; thresholds are fields of :class:`AxisConfig`):

* **Final loss** of a point: the mean held-out loss of its last ``final_rounds`` validation rounds
  (``series``, default the token-weighted aggregate). Its **final seen loss** is the same mean of
  ``seen/repeated`` (the repeated subset) where the run has one, else of ``seen``.
* **Noise** ``sigma`` of a final loss: the round-to-round noise of the point's curve
  (:func:`pretrain.analysis.doubledescent.noise_level`, pooled over its epochs) divided by
  sqrt(``final_rounds``); the axis' ``sigma`` is the root mean square over the points (at least
  ``noise_floor``).
* **Peak**: over the points sorted by ``x``, the index j maximising min(rise, fall) with rise = y[j] -
  min(y[:j+1]) and fall = y[j] - min(y[j:]) (the same rule as a within-epoch bump, without smoothing).
* **Shapes**: ``too_short`` (fewer than 3 points); ``double_descent`` when rise >= ``min_rise_noise``
  sigma and fall >= ``min_fall_noise`` sigma (the loss rises along the axis, then falls again);
  ``rising`` / ``falling`` when the last point is >= ``min_rise_noise`` sigma above / below the first
  and there is no such peak; ``flat`` otherwise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pretrain.analysis import doubledescent
from pretrain.analysis.records import read_metrics


@dataclass
class AxisConfig:
    final_rounds: int = 3  # validation rounds averaged into a point's final loss
    min_rise_noise: float = 3.0  # the rise to the peak, in sigma
    min_fall_noise: float = 3.0  # the fall after the peak, in sigma
    noise_floor: float = 1e-4  # nats


@dataclass
class Point:
    run_dir: Path
    overrides: dict[str, str]
    rows: list[dict] = field(repr=False, default_factory=list)


@dataclass
class AxisResult:
    key: str
    x: list  # sorted axis values (numbers where every value parses as one)
    final_loss: list[float]
    final_seen: list[float | None]
    point_noise: list[float]
    noise: float
    shape: str
    peak_x: object = None
    rise_noise: float | None = None
    fall_noise: float | None = None
    run_dirs: list[str] = field(default_factory=list)
    config: AxisConfig = field(default_factory=AxisConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def is_sweep_dir(path: Path) -> bool:
    """A directory of run directories (not a run directory itself)."""
    return not (path / "metrics.jsonl").exists() and bool(_point_dirs(path))


def _point_dirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if (p / "metrics.jsonl").is_file()), key=lambda p: p.name) \
        if path.is_dir() else []


def load_points(sweep_dir: Path) -> list[Point]:
    """Every run directory of the sweep with its Hydra overrides (``KEY=VALUE`` lines)."""
    from omegaconf import OmegaConf

    points = []
    for d in _point_dirs(sweep_dir):
        path = d / ".hydra" / "overrides.yaml"
        if not path.exists():
            raise ValueError(f"{path} is missing: {d} was not written by a Hydra multirun (gal-train -m ...)")
        overrides = dict(o.lstrip("+~").split("=", 1) for o in OmegaConf.to_container(OmegaConf.load(path))
                         if "=" in o)
        points.append(Point(d, overrides, read_metrics(d / "metrics.jsonl")))
    if not points:
        raise ValueError(f"{sweep_dir}: no run directories with a metrics.jsonl")
    return points


def swept_keys(points: list[Point]) -> list[str]:
    keys = sorted({k for p in points for k in p.overrides})
    return [k for k in keys if len({p.overrides.get(k) for p in points}) > 1]


def metric_value(rows: list[dict], key: str):
    """``key`` (dotted for a nested field) in the last step row that has it, or None."""
    for r in reversed(rows):
        if "event" in r:
            continue
        node = r
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def _axis_values(values: list[str]) -> list:
    try:
        return [float(v) for v in values]
    except ValueError:
        return list(values)


def final_loss(rows: list[dict], series: str, rounds: int) -> tuple[float | None, float | None, float]:
    """(final held-out loss, final seen loss, its noise) of one run (module docstring)."""
    valid = [r for r in rows if r.get("event") == "validation" and r["losses"].get(series) is not None]
    if not valid:
        return None, None, math.nan
    last = valid[-rounds:]
    seen_series = "seen/repeated" if last[-1]["losses"].get("seen/repeated") is not None else "seen"
    seen = [r["losses"].get(seen_series) for r in last]
    result = doubledescent.from_metrics(rows, series)
    return (float(np.mean([r["losses"][series] for r in last])),
            None if None in seen else float(np.mean(seen)), result.noise / math.sqrt(len(last)))


def detect_axis(x: list, y: list[float], noise: list[float], config: AxisConfig | None = None) -> dict:
    """Shape of ``y`` along ``x`` (module docstring): {"shape", "peak_index", "rise_noise", "fall_noise", "noise"}."""
    c = config or AxisConfig()
    order = sorted(range(len(x)), key=lambda i: x[i])
    y = np.asarray([y[i] for i in order], dtype=np.float64)
    sigma = max(float(np.sqrt(np.nanmean(np.square(noise)))) if len(noise) else 0.0, c.noise_floor)
    out = {"shape": "too_short", "peak_index": None, "rise_noise": None, "fall_noise": None, "noise": sigma,
           "order": order}
    if len(y) < 3:
        return out
    rise = y - np.minimum.accumulate(y)
    fall = y - np.minimum.accumulate(y[::-1])[::-1]
    j = int(np.argmax(np.minimum(rise, fall)))
    out.update(rise_noise=float(rise[j] / sigma), fall_noise=float(fall[j] / sigma))
    if rise[j] >= c.min_rise_noise * sigma and fall[j] >= c.min_fall_noise * sigma:
        out.update(shape="double_descent", peak_index=order[j])
    elif y[-1] - y[0] >= c.min_rise_noise * sigma:
        out["shape"] = "rising"
    elif y[0] - y[-1] >= c.min_rise_noise * sigma:
        out["shape"] = "falling"
    else:
        out["shape"] = "flat"
    return out


def analyse(sweep_dir: Path, key: str | None = None, series: str = "aggregate",
            config: AxisConfig | None = None) -> AxisResult:
    """Load a sweep directory and detect the shape of its final held-out loss along ``key``."""
    c = config or AxisConfig()
    points = load_points(Path(sweep_dir))
    keys = swept_keys(points)
    if key is None:
        if len(keys) != 1:
            raise ValueError(f"{sweep_dir}: {len(keys)} swept keys ({', '.join(keys) or 'none'}); "
                             "name the axis with --axis KEY")
        key = keys[0]
    elif key not in keys and any(metric_value(p.rows, key) is None for p in points):
        raise ValueError(f"--axis {key}: neither swept in {sweep_dir} (swept: {', '.join(keys) or 'none'}) "
                         "nor a field of every point's step rows")
    finals = [final_loss(p.rows, series, c.final_rounds) for p in points]
    kept = [(p, f) for p, f in zip(points, finals) if f[0] is not None]
    if not kept:
        raise ValueError(f"{sweep_dir}: no point has a validation round with a {series!r} loss")
    x = _axis_values([p.overrides[key] if key in keys else metric_value(p.rows, key) for p, _ in kept])
    found = detect_axis(x, [f[0] for _, f in kept], [f[2] for _, f in kept], c)
    o = found["order"]
    return AxisResult(key=key, x=[x[i] for i in o], final_loss=[kept[i][1][0] for i in o],
                      final_seen=[kept[i][1][1] for i in o], point_noise=[kept[i][1][2] for i in o],
                      noise=found["noise"], shape=found["shape"],
                      peak_x=None if found["peak_index"] is None else x[found["peak_index"]],
                      rise_noise=found["rise_noise"], fall_noise=found["fall_noise"],
                      run_dirs=[str(kept[i][0].run_dir) for i in o], config=c)


def markdown(result: AxisResult, sweep_dir: Path) -> str:
    lines = [f"# Sweep report: `{sweep_dir}`", "",
             f"Axis: `{result.key}`; final held-out loss = mean of the last {result.config.final_rounds} "
             f"validation rounds; noise sigma of a final loss = {result.noise:.4g}.", "",
             f"**Verdict along the axis: {result.shape}**"
             + (f" (peak at {result.key}={result.peak_x}: rise {result.rise_noise:.1f}σ, fall "
                f"{result.fall_noise:.1f}σ)" if result.shape == "double_descent" else "") + ".", "",
             f"| {result.key} | final held-out | final seen | gap | run |", "|---|---|---|---|---|"]
    for x, y, s, d in zip(result.x, result.final_loss, result.final_seen, result.run_dirs):
        gap = "–" if s is None else f"{y - s:.4f}"
        lines.append(f"| {x} | {y:.4f} | {'–' if s is None else f'{s:.4f}'} | {gap} | `{Path(d).name}` |")
    lines += ["", "Definitions and thresholds: `pretrain/analysis/sweep.py` ("
              + ", ".join(f"{k}={v}" for k, v in asdict(result.config).items()) + ").", ""]
    return "\n".join(lines)


def plot(result: AxisResult, points_rows: dict[str, list[dict]], path: Path, series: str = "aggregate") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    ax = axes[0]
    numeric = all(isinstance(v, float) for v in result.x)
    xs = result.x if numeric else list(range(len(result.x)))
    ax.errorbar(xs, result.final_loss, yerr=result.point_noise, color="black", marker="o", capsize=3,
                label="held-out (final)")
    seen = [(x, s) for x, s in zip(xs, result.final_seen) if s is not None]
    if seen:  # on its own scale: memorisation moves it far more than the held-out loss
        twin = ax.twinx()
        twin.plot(*zip(*seen), color="tab:orange", marker="s", ls="--",
                  label="seen (repeated subset where there is one; final, right axis)")
        twin.set_ylabel("seen loss (nats/token)", color="tab:orange")
        twin.tick_params(axis="y", colors="tab:orange")
        twin.legend(fontsize=8, loc="lower right")
    if result.shape == "double_descent":
        j = result.x.index(result.peak_x)
        ax.scatter([xs[j]], [result.final_loss[j]], marker="^", s=160, color="white", edgecolor="red", zorder=5,
                   label="peak")
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(xs, [str(v) for v in result.x])
    ax.set_xlabel(result.key)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"Final loss along the sweep: {result.shape}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(result.x)))
    for color, x, d in zip(colors, result.x, result.run_dirs):
        pts = [(r["tokens_seen"], r["losses"][series]) for r in points_rows[d]
               if r.get("event") == "validation" and r["losses"].get(series) is not None]
        if pts:
            ax.plot(*zip(*pts), color=color, lw=1.3, label=f"{result.key}={x}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(f"held-out {series} loss")
    ax.set_title("Held-out curves of every point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(sweep_dir: Path, out_dir: Path | None = None, key: str | None = None,
           config: AxisConfig | None = None) -> dict[str, Path]:
    """Write sweep.png, summary.json and summary.md for a sweep directory; returns their paths."""
    import json

    sweep_dir = Path(sweep_dir)
    result = analyse(sweep_dir, key, config=config)
    out = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "sweep.png", "json": out / "summary.json", "md": out / "summary.md"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(result, sweep_dir))
    plot(result, {d: read_metrics(Path(d) / "metrics.jsonl") for d in result.run_dirs}, paths["png"])
    return paths
