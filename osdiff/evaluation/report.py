"""What `osdiff eval` shows: rate-distortion plots (with published points when asked), side-by-
side crops and the offline HTML report, the field's metrics (LPIPS, DISTS, FID/KID) first."""
from __future__ import annotations

import math
from html import escape
from pathlib import Path

from PIL import Image

from ..fileio import write_bytes_atomic
from ..imageio import open_image
from ..quality.inception import FID_RELIABLE_PATCHES
from .codecs import Codec
from .metrics import HIGHER_IS_BETTER, rd_metrics
from .patch_sets import patch_count

PROXY_NOTE = ("kid_taef2 is an in-house proxy measured in the model's own feature space (the TAEF2 "
              "encoder osdiff-tiny's latents, decoder and training live in): KID of texture statistics "
              "of 64-px patches. It is not FID/KID and is kept out of headline claims.")


def plot_curves(curves: dict, names: list[str], out_dir: Path, published: dict | None = None) -> list[str]:
    """One RD plot per metric (plots/rd_<metric>.png); published points as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "plots").mkdir(exist_ok=True)
    files = []
    xmax = min(1.0, max(p["bpp"] for pts in curves.values() for p in pts) * 1.05)
    for m in names:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for codec, pts in curves.items():
            ax.plot([p["bpp"] for p in pts], [p[m] for p in pts], marker="o", ms=3, label=codec,
                    lw=2.2 if codec.startswith("osdiff") else 1.2)
        for method, pts in (published or {}).get("curves", {}).items():
            pts = [p for p in pts if math.isfinite(p.get(m, math.nan)) and p["bpp"] <= xmax]
            if pts:
                ax.plot([p["bpp"] for p in pts], [p[m] for p in pts], ls=":", marker="s", ms=4, mfc="none", lw=0.8,
                        label=f"{method} (published, {published['dataset']})")
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(m + ("" if HIGHER_IS_BETTER[m] else " (lower is better)"))
        ax.set_xlim(0, xmax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6 if published else 8)
        fig.tight_layout()
        name = f"plots/rd_{m}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def side_by_side_crops(images: list, codecs: list[Codec], out_dir: Path, rows: list[dict],
                       target_bpp: float | None = None, n_images: int = 3, crop: int = 192) -> list[dict]:
    """For a few images (EvalImage): original and each codec at the setting whose bpp (from the
    evaluation `rows`) is closest to `target_bpp` (default: the first learned codec's middle
    setting), as 2x-zoomed crops from the image centre. Only the chosen setting is coded again."""
    crops_dir = out_dir / "crops"
    crops_dir.mkdir(exist_ok=True)
    learned = next((c for c in codecs if c.learned), None)
    sets = []
    for img in images[:n_images]:
        pil = open_image(img.path)
        cx, cy = pil.width // 2, pil.height // 2
        box = (max(0, cx - crop // 2), max(0, cy - crop // 2), min(pil.width, cx + crop // 2), min(pil.height, cy + crop // 2))
        bpp = {(r["codec"], str(r["setting"])): float(r["bpp"]) for r in rows if r["image"] == img.key}
        target = target_bpp
        if target is None and learned is not None:
            target = bpp.get((learned.name, str(learned.settings[len(learned.settings) // 2])))
        entries = [("original", None, pil)]
        for codec in codecs:
            known = [s for s in codec.settings if (codec.name, str(s)) in bpp]
            if not known:
                continue
            setting = known[len(known) // 2] if target is None else min(known, key=lambda s: abs(bpp[(codec.name, str(s))] - target))
            data, decoded = codec.encode(pil, setting)
            entries.append((codec.name, (setting, len(data) * 8 / (pil.width * pil.height)), decoded))
        tiles = []
        for label, info, im in entries:
            name = f"crops/{img.id}_{label.replace(':', '_').replace('=', '')}.png"
            im.crop(box).resize(((box[2] - box[0]) * 2, (box[3] - box[1]) * 2), Image.NEAREST).save(out_dir / name)
            tiles.append({"label": label, "file": name, "setting": info[0] if info else None, "bpp": info[1] if info else None})
        sets.append({"image": img.key, "target_bpp": target, "tiles": tiles})
    return sets


def _cell(p: dict, m: str) -> str:
    v = p.get(m, math.nan)
    if not isinstance(v, float) or not math.isfinite(v):
        return "n/a"
    if m == "kid" and math.isfinite(p.get("kid_spread", math.nan)):
        return f"{v:.4f} &plusmn; {p['kid_spread']:.4f}"
    if m == "fid" and patch_count(p) < FID_RELIABLE_PATCHES:
        return f"{v:.2f}*"
    return f"{v:.2f}" if m in ("psnr", "fid") else f"{v:.4f}"


def _bd_rows(table: dict, names: list[str]) -> list[str]:
    return [f"<tr><td>{escape(codec)}</td>" + "".join(
        f"<td>{'n/a' if vals.get(m) is None else f'{vals[m]:+.1f}'}</td>" for m in names) + "</tr>" for codec, vals in table.items()]


def write_report(out_dir: Path, summary: dict, plots: list[str], crop_sets: list[dict]) -> None:
    names = summary["metrics"]
    head = "".join(f"<th>{m}</th>" for m in names)
    parts = ["<!doctype html><meta charset='utf-8'><title>osdiff evaluation</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img.plot{width:420px}"
             ".tiles{display:flex;flex-wrap:wrap;gap:6px}.tiles figure{margin:0}figcaption{font-size:12px}</style>",
             "<h1>osdiff evaluation</h1>",
             f"<p>{summary.get('images', '?')} images. Rate is the real file size (bytes x 8 / pixels). The field's "
             "metrics lead: LPIPS (AlexNet v0.1), DISTS, and FID/KID on 256-px patches (the plain grid and the "
             "grid shifted by 128 px; patch count beside them; KID &plusmn; its spread over subsets; FID on fewer "
             "than 1,000 patches is marked * as indicative). PSNR and MS-SSIM measure fidelity; the other metrics follow. "
             f"BD-rate anchor: <b>{escape(summary['anchor'])}</b>. {escape(summary['note'])}.</p>"]
    if "kid_taef2" in names:
        parts.append(f"<p><b>kid_taef2</b>: {escape(PROXY_NOTE)}</p>")
    if summary["unavailable_metrics"]:
        parts.append("<p>Unavailable metrics: " + "; ".join(f"<b>{escape(k)}</b> ({escape(v)})" for k, v in summary["unavailable_metrics"].items()) + "</p>")
    rd = rd_metrics(names)
    rd_head = "".join(f"<th>{m}</th>" for m in rd)
    parts.append(f"<h2>BD-rate (%) against {escape(summary['anchor'])}</h2><table><tr><th>codec</th>{rd_head}</tr>")
    parts += _bd_rows(summary["bd_rate_percent"], rd)
    parts.append("</table>")
    if summary.get("published"):
        pub = summary["published"]
        parts.append(f"<h2>BD-rate (%) against published points ({escape(pub['dataset'])})</h2>"
                     f"<p>{escape(pub['note'])}. {escape(pub['citation'])}.</p>")
        for codec, table in summary["bd_rate_vs_published"].items():
            parts.append(f"<h3>{escape(codec)} vs</h3><table><tr><th>published</th>{rd_head}</tr>")
            parts += _bd_rows(table, rd)
            parts.append("</table>")
    parts.append(f"<h2>Mean over images, per setting</h2><table><tr><th>codec</th><th>setting</th><th>bpp</th>{head}<th>patches</th></tr>")
    for codec, pts in summary["curves"].items():
        for p in pts:
            parts.append(f"<tr><td>{escape(codec)}</td><td>{escape(str(p['setting']))}</td><td>{p['bpp']:.4f}</td>"
                         + "".join(f"<td>{_cell(p, m)}</td>" for m in names) + f"<td>{patch_count(p) or 'n/a'}</td></tr>")
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
