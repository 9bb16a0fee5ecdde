"""gal-report's figure (``double_descent.png``): what a run's metrics.jsonl says about its losses.

Layout, top to bottom:

* **Overview** (``ax.get_label() == "overview"``): the training loss per step (faint) and its moving
  average, the held-out loss of every source, their token-weighted aggregate and the loss on
  already-seen training samples, against tokens seen (epochs on the top axis). Its y range holds every
  value drawn, the training loss of the first steps included: nothing is clipped here.
* **One panel per source** (``"series:<source>"``), and one for all sources together
  (``"series:aggregate"``) when there is more than one: held-out (solid) and seen (dashed) loss of that
  source on its own y scale, against epochs, with the double-descent events of
  :mod:`pretrain.analysis.doubledescent` (bump peaks ▲, overfitting onsets ✕). The events are a few
  hundredths of a nat, invisible on the overview's scale.

Every axis shows the epoch boundaries (dotted) and has a legend of only what it draws. Validation panels
start at the first validation round. A run without validation rows gets the overview with its training
loss alone.
"""
from __future__ import annotations

import math

import numpy as np

from pretrain.analysis import doubledescent

SEEN_LABELS = {"seen": "seen (trained-on samples)", "seen/repeated": "seen: the repeated subset"}
MARKER_ROUNDS = 60  # fewer rounds than this: each round is drawn as a dot
# A series panel's y range leaves out the first epoch's fall when the rest of the curve spans less than
# this fraction of the whole: otherwise a fall of nats from a fresh model flattens the later epochs,
# whose bumps and rises (hundredths of a nat) are what the panel is for. The overview shows the fall.
ZOOM_BELOW = 1 / 3
TRAIN_COLOR = "tab:purple"


def figure(rows: list[dict], summary: dict):
    """The report figure of a run's rows (matplotlib Figure, Agg backend; the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = [r for r in rows if r.get("event") == "validation"]
    train = [(r["tokens_seen"], r["loss"]) for r in rows
             if "event" not in r and "tokens_seen" in r and _finite(r.get("loss"))]
    bounds = doubledescent.epoch_boundaries(rows)
    names = {k for r in valid for k, v in r["losses"].items() if _finite(v)}
    groups = _groups(names)
    colors = _colors(groups)
    cols = 1 if len(groups) <= 1 else 2
    panel_rows = math.ceil(len(groups) / cols)
    fig = plt.figure(figsize=(12, 5 + 3.6 * panel_rows), constrained_layout=True)
    grid = fig.add_gridspec(1 + panel_rows, cols, height_ratios=[1.5] + [1] * panel_rows)
    _overview(fig.add_subplot(grid[0, :]), train, valid, names, bounds, summary, colors)
    for k, (group, series) in enumerate(groups.items()):
        ax = fig.add_subplot(grid[1 + k // cols, k % cols])
        _series_panel(ax, group, series, valid, bounds, summary, colors)
    return fig


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _groups(names: set[str]) -> dict[str, list[str]]:
    """Panel name → the series it draws: one panel per source (held-out and seen), and ``aggregate``
    (aggregate, seen, seen/repeated) unless it would repeat the curves of the run's only source."""
    held_out = {k for k in names if not k.startswith("seen") and k != "aggregate"}
    streams = {k.removeprefix("seen/") for k in names if k.startswith("seen/") and k != "seen/repeated"}
    sources = sorted(held_out | streams)
    aggregate = [k for k in ("aggregate", "seen", "seen/repeated") if k in names]
    repeats_the_source = len(sources) == 1 and "seen/repeated" not in names and (
        "seen" not in names or f"seen/{sources[0]}" in names)
    groups = {} if repeats_the_source or not aggregate else {"aggregate": aggregate}
    for s in sources:
        groups[s] = [k for k in (s, f"seen/{s}") if k in names]
    return groups


def _colors(groups: dict[str, list[str]]) -> dict[str, str]:
    """A colour per source (its held-out and seen lines share it); black for the aggregate, red for the
    repeated subset. tab10 without the training loss's purple and the repeated subset's red (and grey,
    too close to black)."""
    import matplotlib.pyplot as plt

    palette = [c for i, c in enumerate(plt.cm.tab10.colors) if i not in (3, 4, 7)]  # not red, purple, grey
    colors = {"aggregate": "black", "seen": "black", "seen/repeated": "tab:red"}
    for i, source in enumerate(g for g in groups if g != "aggregate"):
        colors[source] = colors[f"seen/{source}"] = palette[i % len(palette)]
    return colors


def _label(name: str, names: set[str]) -> str:
    if name in SEEN_LABELS:
        return SEEN_LABELS[name]
    if name.startswith("seen/"):
        return f"seen {name.removeprefix('seen/')}"
    if name == "aggregate":
        return "held-out aggregate (token-weighted)"
    single = sum(1 for k in names if not k.startswith("seen") and k != "aggregate") == 1
    return f"held-out {name}" + (" (= aggregate)" if single and "aggregate" in names else "")


def _curve(valid: list[dict], name: str) -> tuple[list[int], list[float]]:
    pts = [(r["tokens_seen"], r["losses"][name]) for r in valid if _finite(r["losses"].get(name))]
    return ([t for t, _ in pts], [y for _, y in pts]) if pts else ([], [])


def _moving_average(y: list[float], points: int) -> np.ndarray:
    """Centred mean over ``points`` steps, shorter at the ends (no edge droop)."""
    kernel = np.ones(points)
    return np.convolve(y, kernel, mode="same") / np.convolve(np.ones(len(y)), kernel, mode="same")


def _overview(ax, train, valid, names, bounds, summary, colors) -> None:
    drawn: list[float] = []
    xs: list[float] = []
    if train:
        t, y = zip(*train)
        window = max(5, len(y) // 50) | 1
        averaged = len(y) >= 4 * window  # too few steps: the raw curve alone, drawn clearly
        ax.plot(t, y, color=TRAIN_COLOR, alpha=0.25 if averaged else 0.9, lw=0.7 if averaged else 1.2,
                label="training loss (each step)", zorder=1)
        if averaged:
            ax.plot(t, _moving_average(list(y), window), color=TRAIN_COLOR, lw=1.5, zorder=2,
                    label=f"training loss ({window}-step moving average)")
        drawn += y
        xs += t
    held_out = sorted(k for k in names if not k.startswith("seen") and k != "aggregate")
    # the aggregate is drawn only when it differs from every source: with one source it is that source's curve
    order = held_out + (["aggregate"] if len(held_out) != 1 else []) + [k for k in ("seen",) if k in names]
    for name in order:
        t, y = _curve(valid, name)
        if not t:
            continue
        aggregate = name in ("aggregate", "seen")
        # the aggregate lies among the sources: thick but see-through and on top, so no source hides under it
        ax.plot(t, y, color=colors.get(name, "black"), lw={"aggregate": 2.6, "seen": 1.8}.get(name, 1.3),
                alpha=0.6 if aggregate else 1.0, ls="--" if name == "seen" else "-",
                marker="." if len(t) < MARKER_ROUNDS and not aggregate else None, ms=4,
                zorder=4 if aggregate else 3, label=_label(name, names))
        drawn += y
        xs += t
    _boundaries(ax, bounds, 1.0, label=True)
    lo, hi = min(drawn), max(drawn)
    pad = 0.05 * (hi - lo) or 0.1
    ax.set_ylim(lo - pad, hi + pad)
    _xlim(ax, min(xs), max(xs))
    unique = summary.get("unique_tokens")
    if unique:
        top = ax.secondary_xaxis("top", functions=(lambda x: x / unique, lambda e: e * unique))
        top.set_xlabel("epoch")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.set_label("overview")
    ax.set_title("Training loss and validation loss" if valid else
                 "Training loss (no validation rows: validation.enabled=false, or no round yet)")
    _legend(ax)


def _xlim(ax, first: float, last: float) -> None:
    """From the first point drawn (no empty stretch before it) to a little past the last."""
    span = last - first or abs(last) or 1.0
    ax.set_xlim(first, last + 0.01 * span)


def _boundaries(ax, bounds: list[int], scale: float, label: bool = False) -> None:
    """Dotted vertical lines at the epoch ends (tokens × ``scale``); ``label``: one legend entry for them."""
    for i, b in enumerate(bounds):
        ax.axvline(b * scale, color="tab:blue", alpha=0.5, lw=1, ls=":", zorder=0,
                   label="epoch end" if label and i == 0 else None)


def _series_panel(ax, group: str, series: list[str], valid, bounds, summary, colors) -> None:
    """One source (or the aggregate): held-out and seen loss on their own y scale, against epochs, with the
    detector's events on the held-out curve."""
    unique = summary.get("unique_tokens") or 1.0
    names = {k for r in valid for k in r["losses"]}
    points: list[tuple[float, float]] = []  # (x, loss) of every round drawn
    late: list[float] = []  # losses from the end of the first epoch on (the zoom's candidates)
    for name in series:
        t, y = _curve(valid, name)
        x = [v / unique for v in t]
        held = not name.startswith("seen")
        ax.plot(x, y, color=colors.get(name, "black"), lw=1.8 if held else 1.3, ls="-" if held else "--",
                marker="." if len(x) < MARKER_ROUNDS else None, ms=4, label=_label(name, names), zorder=3)
        points += zip(x, y)
        late += [v for tok, v in zip(t, y) if bounds and tok >= bounds[0]]
    events = _events(ax, series, valid, summary, unique)
    lo, hi, zoomed = _ylim([y for _, y in points], late, events)
    ax.set_ylim(lo, hi)
    # from the first validation round, or, zoomed, from the first one inside the y range
    first, last = min(x for x, y in points if y <= hi), max(x for x, _ in points)
    _boundaries(ax, [b for b in bounds if first * unique <= b <= last * unique], 1 / unique)
    _xlim(ax, first, last)
    ax.set_xlabel("epoch" if summary.get("unique_tokens") else "tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.set_label(f"series:{group}")
    title = "all sources" if group == "aggregate" else group
    kinds = " and ".join(k for k, drawn in (("held-out", any(not n.startswith("seen") for n in series)),
                                            ("seen", any(n.startswith("seen") for n in series))) if drawn)
    ax.set_title(f"{title}: {kinds} loss, own scale"
                 + ("\n(y from epoch 1's end: the first epoch's fall is in the top panel)" if zoomed else ""),
                 fontsize=10)
    _legend(ax)


def _events(ax, series: list[str], valid, summary: dict, unique: float) -> list[float]:
    """Draw the detector's events of the held-out series in ``series``; the losses they sit at."""
    at: list[float] = []
    for name in series:
        detection = summary.get("detection", {}).get(name)
        if detection is None:
            continue
        curve = dict(zip(*_curve(valid, name)))
        points = [(e["bump_peak_tokens"], "bump") for e in detection["epochs"] if e["bump_peak_tokens"] in curve]
        points += [(e["overfitting_onset_tokens"], "onset") for e in detection["epochs"]
                   if e["overfitting_onset_tokens"] in curve]
        if detection.get("overfitting_onset_tokens") in curve:
            points.append((detection["overfitting_onset_tokens"], "run"))
        for tokens, kind in points:
            style = {"bump": dict(marker="^", s=70, color="white", edgecolor="red", label="bump peak"),
                     "onset": dict(marker="X", s=60, color="red", label="overfitting onset (in the epoch)"),
                     "run": dict(marker="X", s=130, color="red", edgecolor="black",
                                 label="best epoch end before overfitting")}[kind]
            ax.scatter(tokens / unique, curve[tokens], zorder=6, **style)
            at.append(curve[tokens])
    return at


def _ylim(values: list[float], late: list[float], must_show: list[float]) -> tuple[float, float, bool]:
    """A panel's y range (low, high, zoomed): all its values, or (ZOOM_BELOW) those from the first epoch's
    end on, always with the events drawn; ``zoomed`` says whether the first epoch's fall was left out."""
    lo, hi = min(values), max(values)
    zoomed = bool(late) and (max(late) - min(late)) < ZOOM_BELOW * (hi - lo)
    if zoomed:
        lo, hi = min(late + must_show), max(late + must_show)
    pad = 0.08 * (hi - lo) or 0.05
    return lo - pad, hi + pad, zoomed


def _legend(ax) -> None:
    """A legend of what the axis draws, each label once (an event drawn at several points is one entry)."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=8, ncol=2 if len(unique) > 5 else 1)
