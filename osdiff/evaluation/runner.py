"""`osdiff eval`: every codec at every setting on every image of one or more folders, metrics,
aggregates, BD-rates, plots and an offline HTML report. Finished (image, codec, setting) rows
are kept in per_image.csv and skipped on the next run, so an interrupted evaluation resumes;
rows made before a metric existed get its value (the setting is coded again) and the CSV is
rewritten with the new columns."""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
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
from .metrics import HIGHER_IS_BETTER, MetricSuite, headline_order, rd_metrics
from .patch_sets import patch_set_metrics, score_sets

KEY = ("image", "codec", "setting")


@dataclass(frozen=True)
class EvalImage:
    """An image under evaluation: `key` names it in per_image.csv (its file name; with several
    folders, folder/file name), `id` in file names (features, crops)."""

    path: Path
    key: str

    @property
    def id(self) -> str:
        return self.key.rsplit(".", 1)[0].replace("/", "__")


def find_images(folders: Path | list[Path], limit: int | None = None) -> list[EvalImage]:
    """The photos of each folder (the first `limit` of each), keyed by file name, or by
    folder/file name when there are several folders."""
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    images = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise OSDiffError(f"{folder}: not a folder")
        files = list_images(folder, PHOTO_SUFFIXES)
        if not files:
            raise OSDiffError(f"{folder}: no images")
        for f in files[:limit] if limit else files:
            key = f.relative_to(folder).as_posix()
            images.append(EvalImage(f, key if len(folders) == 1 else f"{folder.name}/{key}"))
    if len({i.key for i in images}) < len(images):
        raise OSDiffError("two of the folders have the same name: give folders with different names")
    return images


def _number(v: str | None) -> float | None:
    return float(v) if v not in ("", None) else None


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """(rows, the CSV's columns); values other than the key are floats, None where empty (a
    metric the row was made without)."""
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [{k: (v if k in KEY else _number(v)) for k, v in row.items()} for row in reader]
        return rows, list(reader.fieldnames or [])


def _write_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def evaluate(data_dirs: Path | list[Path], codecs: list[Codec], out_dir: Path, metrics: MetricSuite,
             limit: int | None = None, anchor: str = "jpeg", crops: bool = True,
             crop_bpp: float | None = None, reference: str | None = None) -> dict:
    """Run (or resume) the evaluation; returns the summary written to summary.json.
    Per-image metrics go to per_image.csv; the distribution metrics (FID/KID, kid_taef2) keep
    patch features in features/ and are computed per (codec, setting). `reference`: a published
    dataset (osdiff.evaluation.published) drawn on the plots, with BD-rates against it."""
    from .report import plot_curves, side_by_side_crops, write_report

    set_metrics = patch_set_metrics(metrics.unavailable, proxy=metrics.wanted("kid_taef2"))
    feat_dir = out_dir / "features"
    out_dir.mkdir(parents=True, exist_ok=True)
    images = find_images(data_dirs, limit)
    csv_path = out_dir / "per_image.csv"
    rows, columns = _read_rows(csv_path)
    fields = ["image", "codec", "setting", "bytes", "bpp", *metrics.names]
    fields += [c for c in columns if c not in fields]  # keep what an earlier run measured
    if columns != fields:
        _write_rows(csv_path, rows, fields)
    by_key = {tuple(str(r[k]) for k in KEY): r for r in rows}

    def missing(row: dict | None) -> bool:
        return row is None or any(row.get(m) is None for m in metrics.names)

    def features_missing(img: EvalImage, codec: Codec, setting) -> bool:
        return any(not m.fake_file(feat_dir, img.id, codec.name, setting).is_file() for m in set_metrics)

    todo = [(img, c, s) for img in images for c in codecs for s in c.settings
            if missing(by_key.get((img.key, c.name, str(s)))) or features_missing(img, c, s)]
    cache: dict[Path, tuple[Image.Image, torch.Tensor]] = {}
    for img, codec, setting in progress(todo, desc="eval", unit="code", mininterval=2):
        if img.path not in cache:
            cache.clear()
            pil = open_image(img.path)
            cache[img.path] = (pil, to_tensor(pil))
        pil, ref = cache[img.path]
        data, decoded = codec.encode(pil, setting)
        decoded = to_tensor(decoded)
        for m in set_metrics:
            m.save(feat_dir, img.id, codec.name, setting, ref, decoded)
        row = by_key.get((img.key, codec.name, str(setting)))
        if row is None:
            row = {"image": img.key, "codec": codec.name, "setting": str(setting), "bytes": len(data),
                   "bpp": len(data) * 8 / (pil.width * pil.height), **metrics(decoded, ref)}
            with open(csv_path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="").writerow(row)
            rows.append(row)
            by_key[(img.key, codec.name, str(setting))] = row
        elif missing(row):  # a row from before a metric existed: fill it in, rewrite the CSV
            row.update(metrics(decoded, ref))
            _write_rows(csv_path, rows, fields)
    points = [(c.name, str(s)) for c in codecs for s in c.settings]
    set_scores = score_sets(set_metrics, feat_dir, [i.id for i in images], points) if set_metrics else {}
    keys = {i.key for i in images}
    summary = summarize([r for r in rows if r["image"] in keys], [c.name for c in codecs], metrics.names, anchor,
                        metrics.unavailable, set_scores, [n for m in set_metrics for n in m.names])
    summary["images"] = len(images)
    if reference:
        add_published(summary, reference, [c.name for c in codecs if c.learned])
    write_bytes_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default).encode(), force=True)
    _write_aggregate_csv(out_dir / "aggregate.csv", summary["curves"], summary["metrics"])
    plots = plot_curves(summary["curves"], summary["metrics"], out_dir, summary.get("published"))
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
    counts and KID's spread) beside them, and BD-rate of every metric against `anchor`.
    `summary["metrics"]` lists the metric names, the field's first."""
    set_scores, set_names = set_scores or {}, set_names or []
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["codec"] in codec_names:
            groups[(r["codec"], str(r["setting"]))].append(r)
    curves: dict[str, list[dict]] = defaultdict(list)
    for (codec, setting), rs in groups.items():
        point = {"setting": setting, "images": len(rs), "bpp": float(np.mean([r["bpp"] for r in rs]))}
        for m in names:
            vals = [r[m] for r in rs if isinstance(r.get(m), float) and math.isfinite(r[m])]
            point[m] = float(np.mean(vals)) if vals else math.nan
        point.update({n: math.nan for n in set_names})
        point.update(set_scores.get((codec, setting), {}))
        curves[codec].append(point)
    for codec in curves:
        curves[codec].sort(key=lambda p: p["bpp"])
    all_names = headline_order(names + set_names)
    bd: dict[str, dict[str, float | None]] = {}
    if anchor in curves:
        a = curves[anchor]
        for codec, pts in curves.items():
            if codec != anchor:
                bd[codec] = {m: curve_bd_rate(a, pts, m, HIGHER_IS_BETTER[m]) for m in rd_metrics(all_names)}
    return {"anchor": anchor, "metrics": all_names, "curves": dict(curves), "bd_rate_percent": bd,
            "unavailable_metrics": dict(unavailable or {}),
            "note": "BD-rate: negative = fewer bits than the anchor at equal quality; null = quality ranges do not overlap"}


def add_published(summary: dict, dataset: str, learned: list[str]) -> None:
    """Add the published curves of `dataset` (summary["published"]) and each learned codec's
    BD-rate against each published method (summary["bd_rate_vs_published"]), per metric both have."""
    from .published import CITATION, load_published

    published = load_published(dataset)
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for codec in learned:
        if codec not in summary["curves"]:
            continue
        table[codec] = {method: {m: curve_bd_rate(pts, summary["curves"][codec], m, HIGHER_IS_BETTER[m])
                                 for m in rd_metrics(summary["metrics"]) if m in pts[0]}
                        for method, pts in published.items()}
    summary["published"] = {"dataset": dataset, "citation": CITATION, "curves": published,
                            "note": "published numbers: other images, other machines, their protocol"}
    summary["bd_rate_vs_published"] = table


def _write_aggregate_csv(path: Path, curves: dict, names: list[str]) -> None:
    extra = sorted({k for pts in curves.values() for p in pts for k in p if k.startswith("patches_") or k == "kid_spread"})
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["codec", "setting", "images", "bpp", *names, *extra])
        for codec, pts in curves.items():
            for p in pts:
                w.writerow([codec, p["setting"], p["images"], f"{p['bpp']:.5f}", *(f"{p[m]:.5f}" for m in names),
                            *(f"{p.get(k, math.nan):.6g}" for k in extra)])
    os.replace(tmp, path)
