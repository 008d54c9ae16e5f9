"""`osdiff eval`: every codec at every setting on every image of one or more folders, metrics,
aggregates, BD-rates, plots and an offline HTML report. Finished (image, codec, setting) rows
are kept in per_image.csv (written every few seconds, and in (image, codec, setting) order at
the end) and skipped on the next run, so an interrupted evaluation resumes;
rows made before a metric existed get its value (the setting is coded again) and the CSV is
rewritten with the new columns. Split across processes (`torchrun`, `accelerate launch`; see
osdiff.distributed), each rank codes its share of the images and rank 0 writes everything."""
from __future__ import annotations

import csv
import json
import math
import os
import time
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
from .patch_sets import PatchSetMetric, patch_set_metrics, score_sets

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


@dataclass(frozen=True)
class _Job:
    """One (image, codec, setting) to code: `measure` the per-image metrics (a new row, or a row
    lacking some), the distribution features of kinds `fakes`, and the original's of `reals`."""

    image: int  # index into the images
    codec: int
    setting: int  # index into the codec's settings
    measure: bool
    fakes: tuple[str, ...]
    reals: tuple[str, ...]


class _RowStore:
    """per_image.csv while an evaluation runs: new rows are appended, a filled-in row has the
    file rewritten; writes wait until `every` seconds have passed since the last one (a
    flush(force=True) writes now), so filling in many rows does not rewrite the file per row."""

    def __init__(self, path: Path, fields: list[str], rows: list[dict], every: float = 5.0) -> None:
        self.path, self.fields, self.rows, self.every = path, fields, rows, every
        self.new: list[dict] = []
        self.changed = False
        self.last = time.monotonic()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.new.append(row)

    def flush(self, force: bool = False) -> None:
        if not (self.new or self.changed) or (not force and time.monotonic() - self.last < self.every):
            return
        if self.changed:
            _write_rows(self.path, self.rows, self.fields)
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore", restval="").writerows(self.new)
        self.new, self.changed, self.last = [], False, time.monotonic()

    def put_in_order(self, keys: list[tuple[str, str, str]]) -> None:
        """Rows of `keys` in that order, then any others as they were (rows from earlier runs
        with other images or codecs): the same file whatever the order rows were made in."""
        at = {k: i for i, k in enumerate(keys)}
        ordered = sorted(self.rows, key=lambda r: at.get(_key(r), len(at)))  # stable: others keep their order
        if [id(r) for r in ordered] != [id(r) for r in self.rows]:
            self.rows[:] = ordered
            self.changed = True


def _key(row: dict) -> tuple[str, str, str]:
    return tuple(str(row[k]) for k in KEY)


def _save_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def evaluate(data_dirs: Path | list[Path], codecs: list[Codec], out_dir: Path, metrics: MetricSuite,
             limit: int | None = None, anchor: str = "jpeg", crops: bool = True,
             crop_bpp: float | None = None, reference: str | None = None) -> dict | None:
    """Run (or resume) the evaluation; returns the summary written to summary.json.
    Per-image metrics go to per_image.csv; the distribution metrics (FID/KID, kid_taef2) keep
    patch features in features/ and are computed per (codec, setting). `reference`: a published
    dataset (osdiff.evaluation.published) drawn on the plots, with BD-rates against it.

    In a job split across processes (osdiff.distributed) every rank calls this with the same
    arguments: each codes and measures its share of the images, rank 0 alone reads and writes
    `out_dir` and returns the summary (the same as one process would); the others return None."""
    from .. import distributed as dist

    with dist.session():  # joins the job's process group unless already in it
        return _evaluate(data_dirs, codecs, out_dir, metrics, limit, anchor, crops, crop_bpp, reference)


def _evaluate(data_dirs: Path | list[Path], codecs: list[Codec], out_dir: Path, metrics: MetricSuite,
              limit: int | None, anchor: str, crops: bool, crop_bpp: float | None, reference: str | None) -> dict | None:
    from .. import distributed as dist

    set_metrics = patch_set_metrics(metrics.unavailable, proxy=metrics.wanted("kid_taef2"))
    feat_dir = out_dir / "features"
    store = None
    plan: tuple[list[EvalImage], list[_Job]] | None = None
    with dist.together():
        if dist.is_main():
            images = find_images(data_dirs, limit)
            out_dir.mkdir(parents=True, exist_ok=True)
            _check_identities(out_dir / "codecs.json", codecs)
            store = _open_rows(out_dir / "per_image.csv", metrics.names)
            plan = images, _plan(images, codecs, metrics.names, set_metrics, feat_dir, {_key(r): r for r in store.rows})
    images, jobs = dist.broadcast(plan)
    kinds = {m.kind: m for m in set_metrics}
    shares = [set(dist.shard(sorted({j.image for j in jobs}), r)) for r in range(dist.world_size())]
    mine = [i for i, j in enumerate(jobs) if j.image in shares[dist.rank()]]
    longest = max(sum(j.image in share for j in jobs) for share in shares)  # every rank runs as many rounds
    per_round = 1 if dist.world_size() == 1 else 4
    worker = _Worker(images, codecs, metrics, kinds)
    bar = progress(total=len(jobs), desc="eval", unit="code", mininterval=2, disable=not dist.is_main())
    try:
        for start in range(0, longest, per_round):
            done, failure = [], None
            try:
                for i in mine[start:start + per_round]:
                    done.append((i, worker(jobs[i])))
            except Exception as exc:  # what was done is kept first, then every rank stops
                failure = exc
            gathered = dist.gather(done)
            with dist.together():
                if store is not None:
                    results = sorted((r for part in gathered for r in part), key=lambda r: r[0])
                    _apply(store, feat_dir, kinds, images, codecs, [(jobs[i], r) for i, r in results])
                    bar.update(len(results))
                if failure is not None:
                    raise failure
    finally:
        bar.close()
        if store is not None:
            store.flush(force=True)
    if store is None:
        return None
    store.put_in_order([(i.key, c.name, str(s)) for i in images for c in codecs for s in c.settings])
    store.flush(force=True)
    rows = store.rows
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
    from .report import plot_curves, side_by_side_crops, write_report

    plots = plot_curves(summary["curves"], summary["metrics"], out_dir, summary.get("published"))
    crop_sets = side_by_side_crops(images, codecs, out_dir, rows, crop_bpp) if crops else []
    write_report(out_dir, summary, plots, crop_sets)
    return summary


def _check_identities(path: Path, codecs: list[Codec]) -> None:
    """Keep in `path` what made each codec name's rows (Codec.identity); OSDiffError, before
    anything is coded, if a name now stands for another codec (e.g. a shipped model replaced
    under the same name), whose rows would otherwise be taken for the new one's. Folders made
    before this record take the codecs as they are now."""
    known = json.loads(path.read_text()) if path.is_file() else {}
    for codec in codecs:
        old = known.get(codec.name)
        if old and codec.identity and old != codec.identity:
            raise OSDiffError(f"{path.parent}: its {codec.name} rows were made by {old}, not {codec.identity}; "
                              f"evaluate into another --out, or name it NAME=FOLDER")
        known[codec.name] = old or codec.identity
    write_bytes_atomic(path, json.dumps(known, indent=2, sort_keys=True).encode(), force=True)


def _open_rows(csv_path: Path, names: list[str]) -> _RowStore:
    """The rows of an earlier run, with the columns of `names` added (the CSV rewritten if so)."""
    rows, columns = _read_rows(csv_path)
    fields = ["image", "codec", "setting", "bytes", "bpp", *names]
    fields += [c for c in columns if c not in fields]  # keep what an earlier run measured
    if columns != fields:
        _write_rows(csv_path, rows, fields)
    return _RowStore(csv_path, fields, rows)


def _plan(images: list[EvalImage], codecs: list[Codec], names: list[str], set_metrics: list[PatchSetMetric],
          feat_dir: Path, by_key: dict[tuple[str, str, str], dict]) -> list[_Job]:
    """What is left to do, in (image, codec, setting) order: the settings whose row is missing
    or lacks a metric of `names`, or whose distribution features are missing."""
    jobs, reals_given = [], set()
    for i, img in enumerate(images):
        for c, codec in enumerate(codecs):
            for s, setting in enumerate(codec.settings):
                row = by_key.get((img.key, codec.name, str(setting)))
                measure = row is None or any(row.get(m) is None for m in names)
                fakes = tuple(m.kind for m in set_metrics if not m.fake_file(feat_dir, img.id, codec.name, setting).is_file())
                if not (measure or fakes):
                    continue
                reals = tuple(m.kind for m in set_metrics
                              if (i, m.kind) not in reals_given and not m.real_file(feat_dir, img.id).is_file())
                reals_given.update((i, k) for k in reals)
                jobs.append(_Job(i, c, s, measure, fakes, reals))
    return jobs


class _Worker:
    """Codes one job and measures it; keeps the current image (and so the metrics' features of
    it) while the jobs of one image follow each other."""

    def __init__(self, images: list[EvalImage], codecs: list[Codec], metrics: MetricSuite,
                 kinds: dict[str, PatchSetMetric]) -> None:
        self.images, self.codecs, self.metrics, self.kinds = images, codecs, metrics, kinds
        self.current: tuple[int, Image.Image, torch.Tensor] | None = None

    def __call__(self, job: _Job) -> dict:
        """{"bytes", "pixels", "metrics" (None unless measured), "fakes"/"reals": {kind: features}}."""
        if self.current is None or self.current[0] != job.image:
            self.current = None
            pil = open_image(self.images[job.image].path)
            self.current = (job.image, pil, to_tensor(pil))
        _, pil, ref = self.current
        codec = self.codecs[job.codec]
        data, decoded = codec.encode(pil, codec.settings[job.setting])
        decoded = to_tensor(decoded)
        return {"bytes": len(data), "pixels": pil.width * pil.height,
                "metrics": self.metrics(decoded, ref) if job.measure else None,
                "fakes": {k: self.kinds[k].features(decoded) for k in job.fakes},
                "reals": {k: self.kinds[k].features(ref) for k in job.reals}}


def _apply(store: _RowStore, feat_dir: Path, kinds: dict[str, PatchSetMetric], images: list[EvalImage],
           codecs: list[Codec], results: list[tuple[_Job, dict]]) -> None:
    """Keep finished jobs: their features in feat_dir, their rows in `store` (rank 0)."""
    by_key = {_key(r): r for r in store.rows}
    for job, result in results:
        img, codec = images[job.image], codecs[job.codec]
        setting = codec.settings[job.setting]
        for kind, features in result["reals"].items():
            kinds[kind].folder(feat_dir).mkdir(parents=True, exist_ok=True)
            _save_array(kinds[kind].real_file(feat_dir, img.id), features)
        for kind, features in result["fakes"].items():
            kinds[kind].folder(feat_dir).mkdir(parents=True, exist_ok=True)
            _save_array(kinds[kind].fake_file(feat_dir, img.id, codec.name, setting), features)
        if result["metrics"] is None:
            continue
        row = by_key.get((img.key, codec.name, str(setting)))
        if row is None:
            row = {"image": img.key, "codec": codec.name, "setting": str(setting), "bytes": result["bytes"],
                   "bpp": result["bytes"] * 8 / result["pixels"], **result["metrics"]}
            store.add(row)
            by_key[_key(row)] = row
        else:  # a row from before a metric existed: filled in, the file rewritten at the next flush
            row.update(result["metrics"])
            store.changed = True
    store.flush()


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
