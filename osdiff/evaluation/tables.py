"""Markdown tables from an evaluation summary: the field's metrics per setting, a learned
codec's levels next to classical codecs at the same bits per pixel, the bits those codecs need
for the same quality, and BD-rates."""
from __future__ import annotations

import math

from .bdrate import curve_bd_rate, quality_at_rate, rate_at_quality
from .metrics import HEADLINE, HIGHER_IS_BETTER


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _percent(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f}%"


def headline_table(summary: dict) -> str:
    """One row per (codec, setting): bpp and the field's metrics (LPIPS, DISTS, FID and KID with
    its spread and the patch count; FID on fewer than 1,000 patches marked * as indicative),
    then PSNR and MS-SSIM; the metrics this evaluation has."""
    from .patch_sets import patch_count

    metrics = [m for m in HEADLINE if m in summary["metrics"]]
    rows = [f"| codec | setting | bpp | {' | '.join(metrics)} | patches |", "|---" * (len(metrics) + 4) + "|"]
    for codec, pts in summary["curves"].items():
        for p in pts:
            cells = []
            for m in metrics:
                v = p.get(m)
                cell = _fmt(v, 2 if m in ("psnr", "fid") else 4)
                if m == "kid" and cell != "n/a" and math.isfinite(p.get("kid_spread", math.nan)):
                    cell += f" ± {p['kid_spread']:.4f}"
                if m == "fid" and cell != "n/a" and patch_count(p) < 1000:
                    cell += "*"
                cells.append(cell)
            rows.append(f"| {codec} | {p['setting']} | {p['bpp']:.4f} | " + " | ".join(cells) + f" | {patch_count(p) or 'n/a'} |")
    return "\n".join(rows)


def versus_table(summary: dict, codec: str, others: list[str], metric: str = "dists") -> str:
    """For each level of `codec`: each other codec's `metric` and PSNR at the same bpp, and
    the bpp it needs to reach `codec`'s `metric` (interpolated on its curve; n/a outside it)."""
    curves = summary["curves"]
    psnr = "psnr" if "psnr" in summary["metrics"] else metric
    head = ["level", "bpp", metric, psnr]
    for o in others:
        if o in curves:
            head += [f"{o} {metric} @bpp", f"{o} {psnr} @bpp", f"{o} bpp @{metric}"]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p in curves[codec]:
        cells = [str(p["setting"]), f"{p['bpp']:.4f}", _fmt(p[metric], 4), _fmt(p[psnr], 2)]
        for o in others:
            if o not in curves:
                continue
            c = curves[o]
            rates = [q["bpp"] for q in c]
            cells += [
                _fmt(quality_at_rate(rates, [q[metric] for q in c], p["bpp"]), 4),
                _fmt(quality_at_rate(rates, [q[psnr] for q in c], p["bpp"]), 2),
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


def published_table(summary: dict) -> str:
    """BD-rate (%) of each learned codec against each published method of summary["published"]
    (other images, machines and protocol), for the field's metrics both report."""
    metrics = [m for m in HEADLINE if m in summary["metrics"]]
    pub = summary["published"]
    rows = [f"| vs published ({pub['dataset']}) | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for codec, table in summary["bd_rate_vs_published"].items():
        for method, vals in table.items():
            rows.append(f"| {codec} vs {method} | " + " | ".join(_percent(vals.get(m)) for m in metrics) + " |")
    return "\n".join(rows) + f"\n\n{pub['note']}; {pub['citation']}"
