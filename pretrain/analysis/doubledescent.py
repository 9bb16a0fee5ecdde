"""Epoch-wise double descent and overfitting, detected on a validation curve.

``detect(tokens, losses, epoch_boundaries, seen_losses=...)`` splits one held-out loss curve (one
source, or the aggregate) into epoch segments and says for each what shape it has. It works offline
on a finished run and online after every validation round (the last, unfinished epoch is a segment
with ``complete=False``; its verdict can change as rounds arrive).

Definitions (all thresholds are fields of :class:`DetectConfig`):

* **Segments.** ``epoch_boundaries`` are the ``tokens_seen`` at which epochs 1, 2, ... ended. Epoch k
  holds the points with ``b[k-1] < tokens <= b[k]`` (the round at a boundary closes its epoch; the
  first epoch starts at -inf, the last open one runs to +inf). Segments are smoothed and tested
  separately, so the drop at a boundary is never smeared into the epochs beside it.
* **Smoothing.** ``s`` = centred moving average over ``smooth_points`` rounds (odd; ``None``, the
  default: the odd number nearest a twelfth of the segment's rounds, at least 3: 3 at the default ~20
  rounds an epoch, 5 at 60; fewer at the
  segment's ends), in round order, not in tokens (rounds are denser right after a boundary).
* **Noise** ``sigma``: the standard deviation of one raw point, pooled over all segments with a
  robust estimator, 1.4826 * MAD (MAD = median absolute deviation from the median):
  ``noise_method="interp"`` (default): of each inner point's residual from the straight line through
  its two neighbours (in tokens, so uneven spacing after a boundary is handled; a locally linear trend
  cancels), divided by sqrt(1 + a² + (1-a)²), a and 1-a the interpolation weights;
  ``"diff"``: of the first differences of the raw curve, each segment's
  differences centred on their own median (removing the local slope), divided by sqrt(2) (the
  difference of two points with noise sigma has sigma*sqrt(2));
  ``"residual"``: of the raw curve minus its smoothed curve.
  ``sigma`` is at least ``noise_floor`` (noise-free curves would make any wiggle significant).
  Every size below is in units of ``sigma`` ("noise units").
* **Bump.** For each point j of ``s``: rise(j) = s[j] - min(s[:j+1]), fall(j) = s[j] - min(s[j:]).
  The bump peak is the j that maximises min(rise, fall); its *min* is the argmin of s before it.
  ``bump_noise = rise/sigma``, ``recovery_noise = fall/sigma``. The *recovery* point is the first
  point after the peak where s is at least ``min_recovery_noise*sigma`` below the peak.
* **Anchor.** From epoch 2 on, a segment is measured from the previous epoch's smoothed end (its
  last round's value of ``s``) as well as from its own rounds: a rise right after a boundary is a rise
  from where the previous epoch left off.
* **Shapes**, checked in this order:
  ``too_short``: fewer than ``min_points`` rounds in the segment;
  ``descent_ascent_descent``: bump_noise >= ``min_bump_noise`` and recovery_noise >=
  ``min_recovery_noise`` (a significant rise, then a significant fall again), the rise starting inside
  the epoch (a within-epoch bump);
  ``boundary_ascent_descent``: the same, but the rise starts at the anchor (the loss rises right after
  the boundary, then falls again within the epoch);
  ``ascending``: s ends >= ``min_bump_noise*sigma`` above its minimum (a rise not undone in the epoch);
  ``plateau``: the least-squares line through the raw segment drops by less than
  max(``plateau_drop_noise*sigma``, ``plateau_drop_rel*mean loss``) over the segment's span;
  ``monotone``: otherwise (decreasing; no rise bigger than ``min_bump_noise*sigma``).
  Then, once the next epoch has ``min_points`` rounds, an ``ascending`` or ``plateau`` epoch whose end is
  undone after the boundary (the next epoch's smoothed minimum within its first half is >=
  ``min_recovery_noise*sigma`` below this epoch's smoothed end) becomes ``epoch_wise_double_descent``:
  Galactica's "plateauing (or rising) validation loss followed by a decline" (§5.1, Fig. 6); its
  overfitting onset is cleared, since the rise was undone.
* **Overfitting onset** (needs ``seen_losses``, the loss on already-trained-on sequences, at the same
  rounds): with m = argmin of s in the segment, the onset is ``tokens[m]`` if the held-out curve ends
  the segment >= ``min_bump_noise*sigma`` above s[m] (it rose and did not recover within the epoch)
  while the smoothed seen loss fell over the same points by >= ``seen_min_drop_noise*sigma_seen``
  (sigma_seen estimated like sigma on the seen curve). Otherwise ``None``.
* **Overfitting across epochs** (``Result.overfitting_epoch``, needs ``seen_losses``): the same test
  on the epoch ends: s[-1] of each complete epoch (smoothed within its own segment, so the boundary
  drop is not smeared in; the same place in every epoch). With e the epoch whose end is lowest, the run has
  overfit since epoch e if the last complete epoch ends >= ``min_bump_noise*sigma`` above it while the
  seen loss at the epoch ends fell by >= ``seen_min_drop_noise*sigma_seen`` from epoch e to the last.
  This is the slow rise a within-epoch test misses: each epoch's own rise below the noise, their
  sum above it (Galactica's 120B showed it at the start of epoch 5).

Everything returned is plain Python (``dataclasses.asdict`` gives JSON-serialisable dicts).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

ROUNDS_PER_SMOOTHED_POINT = 12  # the automatic window: a twelfth of a segment's rounds


@dataclass
class DetectConfig:
    smooth_points: int | None = None  # moving-average window in rounds (odd); None: from the segment's length
    noise_method: str = "interp"  # "interp" | "diff" | "residual" (see module docstring)
    noise_floor: float = 1e-4  # lower bound on sigma, in loss units (nats)
    min_bump_noise: float = 2.5  # a rise counts if >= this many sigma (bump, ascending, overfitting)
    min_recovery_noise: float = 2.0  # the fall after the bump peak must be >= this many sigma
    plateau_drop_noise: float = 2.0  # plateau if the fitted drop over the segment < this many sigma ...
    plateau_drop_rel: float = 0.002  # ... or < this fraction of the segment's mean loss
    min_points: int = 5  # fewer rounds in an epoch: shape "too_short"
    seen_min_drop_noise: float = 1.0  # the seen loss must fall by >= this many sigma_seen for overfitting

    def __post_init__(self):
        if self.smooth_points is not None and (self.smooth_points < 1 or self.smooth_points % 2 == 0):
            raise ValueError(f"DetectConfig.smooth_points must be odd and >= 1, got {self.smooth_points}")
        if self.noise_method not in ("interp", "diff", "residual"):
            raise ValueError(f"DetectConfig.noise_method must be 'interp', 'diff' or 'residual', got {self.noise_method!r}")
        if self.min_points < 3:
            raise ValueError(f"DetectConfig.min_points must be >= 3, got {self.min_points}")


@dataclass
class EpochResult:
    epoch: int  # 1-based: the epoch this segment belongs to
    complete: bool  # False for the epoch still running (online)
    n_points: int
    start_tokens: int  # first and last round in the segment
    end_tokens: int
    loss_start: float  # raw losses
    loss_end: float
    loss_min: float
    loss_min_tokens: int
    shape: str  # too_short | descent_ascent_descent | ascending | plateau | monotone (above)
    bump_min_tokens: int | None = None  # set for descent_ascent_descent
    bump_peak_tokens: int | None = None
    bump_recovery_tokens: int | None = None
    bump_noise: float | None = None  # (s[peak] - s[min]) / sigma
    recovery_noise: float | None = None  # (s[peak] - min(s after peak)) / sigma
    fitted_drop: float = 0.0  # least-squares drop of the raw loss over the segment (loss units; < 0 = rose)
    overfitting_onset_tokens: int | None = None


@dataclass
class Result:
    noise: float  # sigma of the held-out curve (loss units)
    seen_noise: float | None
    epochs: list[EpochResult] = field(default_factory=list)
    config: DetectConfig = field(default_factory=DetectConfig)
    overfitting_epoch: int | None = None  # best epoch end before a significant rise (module docstring)
    overfitting_onset_tokens: int | None = None  # the tokens_seen of that epoch end

    def to_dict(self) -> dict:
        return asdict(self)


def window(config: DetectConfig, n: int) -> int:
    """The smoothing window for a segment of ``n`` rounds (module docstring)."""
    if config.smooth_points is not None:
        return config.smooth_points
    return max(3, 2 * round((n / ROUNDS_PER_SMOOTHED_POINT - 1) / 2) + 1)


def smooth(y: np.ndarray, points: int) -> np.ndarray:
    """Centred moving average over ``points`` values, truncated at the ends."""
    h = points // 2
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.maximum(i - h, 0), np.minimum(i + h + 1, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def _mad_sigma(x: np.ndarray) -> float:
    return 1.4826 * float(np.median(np.abs(x - np.median(x)))) if len(x) else 0.0


def noise_level(segments: list[np.ndarray], config: DetectConfig, times: list[np.ndarray] | None = None) -> float:
    """sigma of one raw point, pooled over segments (see the module docstring)."""
    if config.noise_method == "interp":
        parts = []
        for k, y in enumerate(segments):
            if len(y) < 3:
                continue
            t = np.arange(len(y), dtype=np.float64) if times is None else np.asarray(times[k], dtype=np.float64)
            a = (t[2:] - t[1:-1]) / (t[2:] - t[:-2])  # weight of the left neighbour in the interpolation
            r = y[1:-1] - (a * y[:-2] + (1 - a) * y[2:])
            parts.append(r / np.sqrt(1 + a ** 2 + (1 - a) ** 2))
        sigma = _mad_sigma(np.concatenate(parts)) if parts else 0.0
    elif config.noise_method == "diff":
        parts = [np.diff(y) - np.median(np.diff(y)) for y in segments if len(y) >= 3]
        sigma = _mad_sigma(np.concatenate(parts)) / math.sqrt(2) if parts else 0.0
    else:
        parts = [y - smooth(y, window(config, len(y))) for y in segments if len(y) >= 3]
        sigma = _mad_sigma(np.concatenate(parts)) if parts else 0.0
    return max(sigma, config.noise_floor)


def _segments(tokens: np.ndarray, epoch_boundaries) -> list[tuple[int, bool, np.ndarray]]:
    """(1-based epoch, complete, indices) for every epoch that has at least one round."""
    b = np.sort(np.asarray(list(epoch_boundaries), dtype=np.float64))
    which = np.searchsorted(b, tokens, side="left")  # points at a boundary close their epoch
    return [(k + 1, k < len(b), np.flatnonzero(which == k)) for k in range(len(b) + 1) if np.any(which == k)]


def detect(tokens, losses, epoch_boundaries, *, seen_losses=None, config: DetectConfig | None = None) -> Result:
    """Shape of each epoch of one validation curve and the overfitting onset (module docstring).

    ``tokens``: tokens_seen of each round; ``losses``: its held-out loss; ``epoch_boundaries``: the
    tokens_seen at which each finished epoch ended; ``seen_losses``: the loss on the fixed sample of
    trained-on sequences at the same rounds (optional; needed for the overfitting onset). Rounds with a
    missing (None/NaN) loss are dropped.
    """
    config = config or DetectConfig()
    tokens = np.asarray(tokens, dtype=np.float64)
    losses = np.asarray([np.nan if v is None else v for v in losses], dtype=np.float64)
    seen = None if seen_losses is None else np.asarray([np.nan if v is None else v for v in seen_losses],
                                                       dtype=np.float64)
    if len(tokens) != len(losses) or (seen is not None and len(seen) != len(losses)):
        raise ValueError(f"detect: tokens ({len(tokens)}), losses ({len(losses)}) and seen_losses "
                         f"({None if seen is None else len(seen)}) must have the same length")
    keep = np.isfinite(losses) & np.isfinite(tokens)
    order = np.argsort(tokens[keep], kind="stable")
    tokens, losses = tokens[keep][order], losses[keep][order]
    if seen is not None:
        seen = seen[keep][order]
        if not np.all(np.isfinite(seen)):
            seen = None  # a round without its seen loss: no overfitting test rather than a wrong one

    segs = _segments(tokens, epoch_boundaries)
    times = [tokens[i] for _, _, i in segs]
    sigma = noise_level([losses[i] for _, _, i in segs], config, times)
    sigma_seen = None if seen is None else noise_level([seen[i] for _, _, i in segs], config, times)
    result = Result(noise=sigma, seen_noise=sigma_seen, config=config)
    anchor = None
    for epoch, complete, idx in segs:
        result.epochs.append(_segment(epoch, complete, tokens[idx], losses[idx], None if seen is None else seen[idx],
                                      sigma, sigma_seen, config, anchor))
        anchor = smooth(losses[idx], window(config, len(idx)))[-1] if complete else None
    _undone_at_boundaries(result.epochs, [losses[i] for _, _, i in segs], sigma, config)
    ends = [(epoch, idx) for epoch, complete, idx in segs if complete]
    if seen is not None and len(ends) >= 2:
        held_end = np.array([smooth(losses[i], window(config, len(i)))[-1] for _, i in ends])
        seen_end = np.array([smooth(seen[i], window(config, len(i)))[-1] for _, i in ends])
        m = int(np.argmin(held_end))
        if (held_end[-1] - held_end[m] >= config.min_bump_noise * sigma
                and seen_end[m] - seen_end[-1] >= config.seen_min_drop_noise * sigma_seen):
            result.overfitting_epoch, result.overfitting_onset_tokens = ends[m][0], int(tokens[ends[m][1][-1]])
    return result


def _segment(epoch, complete, t, y, seen, sigma, sigma_seen, c: DetectConfig, anchor=None) -> EpochResult:
    m_raw = int(np.argmin(y))
    r = EpochResult(epoch=epoch, complete=complete, n_points=len(y), start_tokens=int(t[0]),
                    end_tokens=int(t[-1]), loss_start=float(y[0]), loss_end=float(y[-1]),
                    loss_min=float(y[m_raw]), loss_min_tokens=int(t[m_raw]), shape="too_short")
    if len(y) < c.min_points:
        return r
    s = smooth(y, window(c, len(y)))
    slope = np.polyfit(t - t[0], y, 1)[0] if t[-1] > t[0] else 0.0
    r.fitted_drop = float(-slope * (t[-1] - t[0]))

    low = np.minimum.accumulate(s) if anchor is None else np.minimum.accumulate(np.minimum(s, anchor))
    rise = s - low
    fall = s - np.minimum.accumulate(s[::-1])[::-1]
    peak = int(np.argmax(np.minimum(rise, fall)))
    bump, recovery = rise[peak] / sigma, fall[peak] / sigma
    m = int(np.argmin(s))
    if bump >= c.min_bump_noise and recovery >= c.min_recovery_noise:
        lo = int(np.argmin(s[:peak + 1]))
        from_anchor = anchor is not None and (lo == 0 or anchor <= s[lo])  # the rise starts at the boundary
        r.shape = "boundary_ascent_descent" if from_anchor else "descent_ascent_descent"
        rec = peak + int(np.argmax(s[peak:] <= s[peak] - c.min_recovery_noise * sigma))
        r.bump_min_tokens = None if from_anchor else int(t[lo])  # None: the previous epoch's end
        r.bump_peak_tokens, r.bump_recovery_tokens = int(t[peak]), int(t[rec])
        r.bump_noise, r.recovery_noise = float(bump), float(recovery)
    elif s[-1] - s[m] >= c.min_bump_noise * sigma:
        r.shape = "ascending"
    elif r.fitted_drop < max(c.plateau_drop_noise * sigma, c.plateau_drop_rel * float(np.mean(y))):
        r.shape = "plateau"
    else:
        r.shape = "monotone"

    if seen is not None and s[-1] - s[m] >= c.min_bump_noise * sigma:
        q = smooth(seen, window(c, len(seen)))
        if q[m] - q[-1] >= c.seen_min_drop_noise * sigma_seen:
            r.overfitting_onset_tokens = int(t[m])
    return r


def _undone_at_boundaries(epochs: list[EpochResult], losses: list[np.ndarray], sigma: float,
                          c: DetectConfig) -> None:
    """Galactica's epoch-wise double descent: a rising or flat epoch whose end the next epoch undoes."""
    for k in range(len(epochs) - 1):
        e, nxt, y_next = epochs[k], epochs[k + 1], losses[k + 1]
        if not e.complete or e.shape not in ("ascending", "plateau") or len(y_next) < c.min_points:
            continue
        end = smooth(losses[k], window(c, len(losses[k])))[-1]
        head = smooth(y_next, window(c, len(y_next)))[:max(c.min_points, len(y_next) // 2)]
        if end - head.min() >= c.min_recovery_noise * sigma:
            e.shape, e.overfitting_onset_tokens = "epoch_wise_double_descent", None


def from_metrics(rows: list[dict], series: str = "aggregate", config: DetectConfig | None = None) -> Result:
    """``detect`` on one series (a source name or "aggregate") of the validation rows of metrics.jsonl,
    with the seen probe as ``seen_losses`` and the ``epoch_end`` events as boundaries."""
    valid = [r for r in rows if r.get("event") == "validation" and series in r.get("losses", {})]
    return detect([r["tokens_seen"] for r in valid], [r["losses"][series] for r in valid],
                  epoch_boundaries(rows), seen_losses=[r["losses"].get("seen") for r in valid], config=config)


def epoch_boundaries(rows: list[dict]) -> list[int]:
    """tokens_seen at each ``epoch_end`` event (or, failing those, each ``epoch_boundary`` round)."""
    ends = {r["epoch"]: r["tokens_seen"] for r in rows if r.get("event") == "epoch_end"}
    if not ends:
        ends = {r["repeat"]: r["tokens_seen"] for r in rows
                if r.get("event") == "validation" and r.get("reason") == "epoch_boundary"}
    return [ends[k] for k in sorted(ends)]
