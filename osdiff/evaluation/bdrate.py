"""Bjøntegaard delta rate: average bitrate difference (%) of a test curve against an anchor
at equal quality, over the quality range both curves cover.

Both curves are interpolated as log(rate) against quality with monotone piecewise-cubic
(PCHIP) interpolation and integrated over the overlap, as in the common BD-rate tools.
"""
from __future__ import annotations

import math

import numpy as np


_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it


def _clean(rates, quality, higher_is_better: bool):
    pts = sorted((q if higher_is_better else -q, r) for r, q in zip(rates, quality) if r > 0 and np.isfinite(q))
    qs, rs = [], []
    for q, r in pts:  # keep quality strictly increasing
        if not qs or q > qs[-1]:
            qs.append(q)
            rs.append(math.log(r))
    return np.array(qs), np.array(rs)


def bd_rate(anchor_rates, anchor_quality, test_rates, test_quality, higher_is_better: bool = True) -> float | None:
    """Percent rate change of test vs anchor (negative = test needs fewer bits).
    None when the curves' quality ranges do not overlap or a curve has < 2 points."""
    from scipy.interpolate import PchipInterpolator

    qa, ra = _clean(anchor_rates, anchor_quality, higher_is_better)
    qt, rt = _clean(test_rates, test_quality, higher_is_better)
    if len(qa) < 2 or len(qt) < 2:
        return None
    lo, hi = max(qa[0], qt[0]), min(qa[-1], qt[-1])
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, 200)
    ia = _trapezoid(PchipInterpolator(qa, ra)(grid), grid)
    it = _trapezoid(PchipInterpolator(qt, rt)(grid), grid)
    return float((math.exp((it - ia) / (hi - lo)) - 1) * 100)


def curve_bd_rate(anchor: list[dict], test: list[dict], metric: str, higher_is_better: bool = True) -> float | None:
    """`bd_rate` of two evaluation curves: lists of points {"bpp": ..., metric: ...}."""
    return bd_rate([p["bpp"] for p in anchor], [p[metric] for p in anchor],
                   [p["bpp"] for p in test], [p[metric] for p in test], higher_is_better)


def rate_at_quality(rates, quality, target: float, higher_is_better: bool = True) -> float | None:
    """Rate a curve needs to reach `target` quality (log-rate interpolation), or None."""
    q, r = _clean(rates, quality, higher_is_better)
    t = target if higher_is_better else -target
    if len(q) < 2 or not q[0] <= t <= q[-1]:
        return None
    return float(math.exp(np.interp(t, q, r)))


def quality_at_rate(rates, quality, target_rate: float) -> float | None:
    """Quality of a curve at `target_rate` (linear in log-rate), or None outside its range."""
    pts = sorted((math.log(r), q) for r, q in zip(rates, quality) if r > 0 and np.isfinite(q))
    if len(pts) < 2:
        return None
    lr, qs = zip(*pts)
    x = math.log(target_rate)
    if not lr[0] <= x <= lr[-1]:
        return None
    return float(np.interp(x, lr, qs))
