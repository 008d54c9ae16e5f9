"""Time and peak memory of `osdiff compress` / `osdiff decompress` on a large image.

    python scripts/large_image.py ../shared/data/images/wikipedia-photos --out /tmp/large [--grid 4x4]

Builds a mosaic of the folder's first photos (each cropped/resized to 1024x768, so a 4x4 grid is
4096x3072 = 12.6 megapixels of real photo detail), then runs the two CLI commands in child
processes and reports wall time, peak resident memory (ru_maxrss of each child), bpp and PSNR.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from osdiff.imageio import PHOTO_SUFFIXES, find_images
from osdiff.quality.pixel import psnr_uint8


def run(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{' '.join(cmd)} failed ({status})")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--grid", default="4x4", help="COLSxROWS of 1024x768 tiles")
    ap.add_argument("--quality", default="2")
    args = ap.parse_args()
    cols, rows = (int(v) for v in args.grid.split("x"))
    photos = find_images(args.folder, PHOTO_SUFFIXES)[: cols * rows]
    if len(photos) < cols * rows:
        sys.exit(f"{args.folder}: need {cols * rows} photos")
    mosaic = Image.new("RGB", (1024 * cols, 768 * rows))
    for i, path in enumerate(photos):
        with Image.open(path) as im:
            tile = ImageOps.fit(im.convert("RGB"), (1024, 768), Image.LANCZOS)
        mosaic.paste(tile, (1024 * (i % cols), 768 * (i // cols)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src, osd, png = out / "mosaic.png", out / "mosaic.osd", out / "mosaic.decoded.png"
    mosaic.save(src)
    for p in (osd, png):
        p.unlink(missing_ok=True)
    osdiff = [sys.executable, "-m", "osdiff.cli"]
    enc_s, enc_mb = run(osdiff + ["compress", str(src), "-o", str(osd), "-q", args.quality])
    dec_s, dec_mb = run(osdiff + ["decompress", str(osd), "-o", str(png)])
    psnr = psnr_uint8(np.asarray(Image.open(png).convert("RGB")), np.asarray(mosaic.convert("RGB")))
    pixels = mosaic.width * mosaic.height
    print(f"{mosaic.width}x{mosaic.height} ({pixels / 1e6:.1f} MP), quality {args.quality}: "
          f"{osd.stat().st_size} bytes, {osd.stat().st_size * 8 / pixels:.4f} bpp, PSNR {psnr:.2f} dB")
    print(f"compress:   {enc_s:.1f} s, peak RSS {enc_mb:.0f} MiB")
    print(f"decompress: {dec_s:.1f} s, peak RSS {dec_mb:.0f} MiB")


if __name__ == "__main__":
    main()
