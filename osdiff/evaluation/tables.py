"""Markdown tables from an evaluation summary: a learned codec's levels next to classical
codecs at the same bits per pixel, and the bits those codecs need for the same quality."""
from __future__ import annotations

import math

from .bdrate import curve_bd_rate, quality_at_rate, rate_at_quality
from .metrics import HIGHER_IS_BETTER


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _percent(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f}%"


def level_table(summary: dict, codec: str, metrics: list[str]) -> str:
    """One row per quality level of `codec`: bpp and each metric (means over images)."""
    rows = [f"| level | bpp | {' | '.join(metrics)} |", "|---" * (len(metrics) + 2) + "|"]
    for p in summary["curves"][codec]:
        rows.append(f"| {p['setting']} | {p['bpp']:.4f} | " + " | ".join(_fmt(p.get(m), 2 if m == 'psnr' else 4) for m in metrics) + " |")
    return "\n".join(rows)


def versus_table(summary: dict, codec: str, others: list[str], metric: str = "haarpsi") -> str:
    """For each level of `codec`: each other codec's `metric` and PSNR at the same bpp, and
    the bpp it needs to reach `codec`'s `metric` (interpolated on its curve; n/a outside it)."""
    curves = summary["curves"]
    head = ["level", "bpp", metric, "psnr"]
    for o in others:
        if o in curves:
            head += [f"{o} {metric} @bpp", f"{o} psnr @bpp", f"{o} bpp @{metric}"]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p in curves[codec]:
        cells = [str(p["setting"]), f"{p['bpp']:.4f}", _fmt(p[metric], 4), _fmt(p["psnr"], 2)]
        for o in others:
            if o not in curves:
                continue
            c = curves[o]
            rates = [q["bpp"] for q in c]
            cells += [
                _fmt(quality_at_rate(rates, [q[metric] for q in c], p["bpp"]), 4),
                _fmt(quality_at_rate(rates, [q["psnr"] for q in c], p["bpp"]), 2),
                _fmt(rate_at_quality(rates, [q[metric] for q in c], p[metric], HIGHER_IS_BETTER[metric]), 4),
            ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def bd_table(summary: dict, metrics: list[str]) -> str:
    rows = [f"| codec vs {summary['anchor']} | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for codec, vals in summary["bd_rate_percent"].items():
        rows.append(f"| {codec} | " + " | ".join(_percent(vals.get(m)) for m in metrics) + " |")
    return "\n".join(rows)


def bd_against_each(summary: dict, codec: str, metrics: list[str]) -> str:
    """BD-rate (%) of `codec` with every other codec of the summary as the anchor, per metric
    (negative = `codec` needs fewer bits for the same quality)."""
    curves = summary["curves"]
    test = curves[codec]
    rows = [f"| {codec} vs | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for anchor, pts in curves.items():
        if anchor == codec:
            continue
        cells = [_percent(curve_bd_rate(pts, test, m, HIGHER_IS_BETTER[m])) for m in metrics]
        rows.append(f"| {anchor} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
