"""`osdiff eval`: every codec at every setting on every image, metrics, aggregates,
BD-rates, plots and an offline HTML report. Finished (image, codec, setting) rows are kept in
per_image.csv and skipped on the next run, so an interrupted evaluation resumes."""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import OSDiffError
from ..fileio import write_bytes_atomic
from ..imageio import PHOTO_SUFFIXES, open_image, to_tensor
from ..imageio import find_images as list_images
from ..verbosity import progress
from .bdrate import curve_bd_rate
from .codecs import Codec
from .metrics import HIGHER_IS_BETTER, MetricSuite
from .patch_sets import patch_set_metrics, score_sets

KEY = ("image", "codec", "setting")


def find_images(folder: Path, limit: int | None = None) -> list[Path]:
    if not folder.is_dir():
        raise OSDiffError(f"{folder}: not a folder")
    files = list_images(folder, PHOTO_SUFFIXES)
    if not files:
        raise OSDiffError(f"{folder}: no images")
    return files[:limit] if limit else files


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {k: (v if k in ("image", "codec", "setting") else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def evaluate(data_dir: Path, codecs: list[Codec], out_dir: Path, metrics: MetricSuite,
             limit: int | None = None, anchor: str = "jpeg", crops: bool = True, inception: str | None = None,
             crop_bpp: float | None = None) -> dict:
    """Run (or resume) the evaluation; returns the summary written to summary.json.
    Per-image metrics go to per_image.csv; the distribution metrics (osdiff.evaluation.patch_sets:
    kid_taef2, and FID/KID with Inception weights) keep patch features in features/ and are
    computed per (codec, setting)."""
    set_metrics = patch_set_metrics(inception, metrics.unavailable)
    feat_dir = out_dir / "features"
    out_dir.mkdir(parents=True, exist_ok=True)
    images = find_images(data_dir, limit)
    csv_path = out_dir / "per_image.csv"
    rows = _read_rows(csv_path)
    done = {tuple(str(r[k]) for k in KEY) for r in rows}
    fields = ["image", "codec", "setting", "bytes", "bpp", *metrics.names]

    def features_missing(img: Path, codec: Codec, setting) -> bool:
        return any(not m.fake_file(feat_dir, img, codec.name, setting).is_file() for m in set_metrics)

    # new rows, and rows evaluated before a distribution metric existed (coded again for its features only)
    todo = [(img, c, s, (img.name, c.name, str(s)) not in done) for img in images for c in codecs for s in c.settings
            if (img.name, c.name, str(s)) not in done or features_missing(img, c, s)]
    new_file = not csv_path.is_file()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        cache: dict[Path, tuple[Image.Image, torch.Tensor]] = {}
        for img_path, codec, setting, new_row in progress(todo, desc="eval", unit="code", mininterval=2):
            if img_path not in cache:
                cache.clear()
                pil = open_image(img_path)
                cache[img_path] = (pil, to_tensor(pil))
            pil, ref = cache[img_path]
            data, decoded = codec.encode(pil, setting)
            decoded = to_tensor(decoded)
            for m in set_metrics:
                m.save(feat_dir, img_path, codec.name, setting, ref, decoded)
            if new_row:
                row = {"image": img_path.name, "codec": codec.name, "setting": str(setting), "bytes": len(data),
                       "bpp": len(data) * 8 / (pil.width * pil.height), **metrics(decoded, ref)}
                writer.writerow(row)
                f.flush()
                rows.append(row)
    points = [(c.name, str(s)) for c in codecs for s in c.settings]
    set_scores = score_sets(set_metrics, feat_dir, images, points) if set_metrics else {}
    summary = summarize(rows, [c.name for c in codecs], metrics.names, anchor, metrics.unavailable, set_scores,
                        [n for m in set_metrics for n in m.names])
    write_bytes_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default).encode(), force=True)
    _write_aggregate_csv(out_dir / "aggregate.csv", summary["curves"], summary["metrics"])
    plots = plot_curves(summary["curves"], summary["metrics"], out_dir)
    crop_sets = side_by_side_crops(images, codecs, out_dir, rows, crop_bpp) if crops else []
    write_report(out_dir, summary, plots, crop_sets)
    return summary


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    raise TypeError(type(o).__name__)


def summarize(rows: list[dict], codec_names: list[str], names: list[str], anchor: str,
              unavailable: dict[str, str] | None = None,
              set_scores: dict[tuple[str, str], dict[str, float]] | None = None,
              set_names: list[str] | None = None) -> dict:
    """Mean bpp and mean of each per-image metric in `names` per (codec, setting), the
    distribution metrics `set_names` from `set_scores` (per (codec, setting), with their patch
    counts) beside them, and BD-rate of every metric against `anchor`. `summary["metrics"]`
    lists the metric names in order."""
    set_scores, set_names = set_scores or {}, set_names or []
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["codec"] in codec_names:
            groups[(r["codec"], str(r["setting"]))].append(r)
    curves: dict[str, list[dict]] = defaultdict(list)
    for (codec, setting), rs in groups.items():
        point = {"setting": setting, "images": len(rs), "bpp": float(np.mean([r["bpp"] for r in rs]))}
        for m in names:
            vals = [r[m] for r in rs if isinstance(r[m], float) and math.isfinite(r[m])]
            point[m] = float(np.mean(vals)) if vals else math.nan
        point.update({n: math.nan for n in set_names})
        point.update(set_scores.get((codec, setting), {}))
        curves[codec].append(point)
    for codec in curves:
        curves[codec].sort(key=lambda p: p["bpp"])
    all_names = names + set_names
    bd: dict[str, dict[str, float | None]] = {}
    if anchor in curves:
        a = curves[anchor]
        for codec, pts in curves.items():
            if codec == anchor:
                continue
            bd[codec] = {
                m: curve_bd_rate(a, pts, m, HIGHER_IS_BETTER[m]) for m in all_names
            }
    return {"anchor": anchor, "metrics": all_names, "curves": dict(curves), "bd_rate_percent": bd,
            "unavailable_metrics": dict(unavailable or {}),
            "note": "BD-rate: negative = fewer bits than the anchor at equal quality; null = quality ranges do not overlap"}


def _write_aggregate_csv(path: Path, curves: dict, names: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["codec", "setting", "images", "bpp", *names])
        for codec, pts in curves.items():
            for p in pts:
                w.writerow([codec, p["setting"], p["images"], f"{p['bpp']:.5f}", *(f"{p[m]:.5f}" for m in names)])
    os.replace(tmp, path)


def plot_curves(curves: dict, names: list[str], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "plots").mkdir(exist_ok=True)
    files = []
    for m in names:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for codec, pts in curves.items():
            xs = [p["bpp"] for p in pts]
            ys = [p[m] for p in pts]
            ax.plot(xs, ys, marker="o", ms=3, label=codec, lw=2.2 if codec.startswith("osdiff") else 1.2)
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(m + ("" if HIGHER_IS_BETTER[m] else " (lower is better)"))
        ax.set_xlim(0, min(1.0, max(p["bpp"] for pts in curves.values() for p in pts) * 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"plots/rd_{m}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def side_by_side_crops(images: list[Path], codecs: list[Codec], out_dir: Path, rows: list[dict],
                       target_bpp: float | None = None, n_images: int = 3, crop: int = 192) -> list[dict]:
    """For a few images: original and each codec at the setting whose bpp (from the evaluation
    `rows`) is closest to `target_bpp` (default: the first learned codec's middle setting), as
    2x-zoomed crops from the image centre. Only the chosen setting is coded again, to get its pixels."""
    crops_dir = out_dir / "crops"
    crops_dir.mkdir(exist_ok=True)
    learned = next((c for c in codecs if c.learned), None)
    sets = []
    for img_path in images[:n_images]:
        pil = open_image(img_path)
        cx, cy = pil.width // 2, pil.height // 2
        box = (max(0, cx - crop // 2), max(0, cy - crop // 2), min(pil.width, cx + crop // 2), min(pil.height, cy + crop // 2))
        bpp = {(r["codec"], str(r["setting"])): float(r["bpp"]) for r in rows if r["image"] == img_path.name}
        target = target_bpp
        if target is None and learned is not None:
            target = bpp.get((learned.name, str(learned.settings[len(learned.settings) // 2])))
        entries = [("original", None, pil)]
        for codec in codecs:
            known = [s for s in codec.settings if (codec.name, str(s)) in bpp]
            if not known:
                continue
            if target is None:
                setting = known[len(known) // 2]
            else:
                setting = min(known, key=lambda s: abs(bpp[(codec.name, str(s))] - target))
            data, decoded = codec.encode(pil, setting)
            entries.append((codec.name, (setting, len(data) * 8 / (pil.width * pil.height)), decoded))
        tiles = []
        for label, info, im in entries:
            name = f"crops/{img_path.stem}_{label}.png"
            im.crop(box).resize(((box[2] - box[0]) * 2, (box[3] - box[1]) * 2), Image.NEAREST).save(out_dir / name)
            tiles.append({"label": label, "file": name, "setting": info[0] if info else None, "bpp": info[1] if info else None})
        sets.append({"image": img_path.name, "target_bpp": target, "tiles": tiles})
    return sets


def write_report(out_dir: Path, summary: dict, plots: list[str], crop_sets: list[dict]) -> None:
    from html import escape

    names = summary["metrics"]
    parts = ["<!doctype html><meta charset='utf-8'><title>osdiff evaluation</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img.plot{width:420px}"
             ".tiles{display:flex;flex-wrap:wrap;gap:6px}.tiles figure{margin:0}figcaption{font-size:12px}</style>",
             "<h1>osdiff evaluation</h1>",
             f"<p>Rate is the real file size (bytes x 8 / pixels). BD-rate anchor: <b>{escape(summary['anchor'])}</b>. "
             f"{escape(summary['note'])}.</p>"]
    if "kid_taef2" in names:
        parts.append("<p><b>kid_taef2</b> (lower is better) is a realism proxy, not a fidelity score: the kernel "
                     "distance between the texture statistics of the decoded images' 64-px patches and the "
                     "originals', in the frozen TAEF2 encoder shipped with osdiff-tiny. Blur and added noise "
                     "both raise it; plausible texture that differs from the photo's does not. It is not FID.</p>")
    if summary["unavailable_metrics"]:
        parts.append("<p>Unavailable metrics: " + "; ".join(f"<b>{escape(k)}</b> ({escape(v)})" for k, v in summary["unavailable_metrics"].items()) + "</p>")
    parts.append("<h2>BD-rate (%) against " + escape(summary["anchor"]) + "</h2><table><tr><th>codec</th>" + "".join(f"<th>{m}</th>" for m in names) + "</tr>")
    for codec, vals in summary["bd_rate_percent"].items():
        parts.append(f"<tr><td>{escape(codec)}</td>" + "".join(f"<td>{'n/a' if vals[m] is None else f'{vals[m]:+.1f}'}</td>" for m in names) + "</tr>")
    parts.append("</table><h2>Mean over images, per setting</h2><table><tr><th>codec</th><th>setting</th><th>bpp</th>" + "".join(f"<th>{m}</th>" for m in names) + "</tr>")
    for codec, pts in summary["curves"].items():
        for p in pts:
            parts.append(f"<tr><td>{escape(codec)}</td><td>{escape(str(p['setting']))}</td><td>{p['bpp']:.4f}</td>" + "".join(f"<td>{p[m]:.4f}</td>" for m in names) + "</tr>")
    parts.append("</table><h2>Rate-distortion curves</h2><div>" + "".join(f"<img class='plot' src='{p}' alt='{p}'>" for p in plots) + "</div>")
    if crop_sets:
        parts.append("<h2>Side by side (2x zoom, centre crops, each codec at the setting whose bpp is closest to the target)</h2>")
        for s in crop_sets:
            target = "" if s["target_bpp"] is None else f" (target {s['target_bpp']:.3f} bpp)"
            parts.append(f"<h3>{escape(s['image'])}{target}</h3><div class='tiles'>")
            for t in s["tiles"]:
                cap = t["label"] if t["bpp"] is None else f"{t['label']} q={t['setting']} {t['bpp']:.3f} bpp"
                parts.append(f"<figure><img src='{t['file']}' alt='{escape(cap)}'><figcaption>{escape(cap)}</figcaption></figure>")
            parts.append("</div>")
    write_bytes_atomic(out_dir / "report.html", "\n".join(parts).encode(), force=True)
