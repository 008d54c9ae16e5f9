"""The README's main job: compress and decompress one image with the embedded default model
through the `osdiff` command, then print bits per pixel, PSNR and the output paths.

    python scripts/demo.py [IMAGE]

Without IMAGE it uses the first photo of ../shared/data/images when that folder exists,
otherwise it draws a synthetic test picture.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from osdiff.quality.pixel import psnr_uint8

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-output"
SHARED = ROOT.parent / "shared" / "data" / "images" / "cbsd68"


def sample_image() -> Path:
    photos = sorted(SHARED.glob("*.png")) if SHARED.is_dir() else []
    if photos:
        return photos[0]
    y, x = np.mgrid[0:384, 0:512]
    sky = np.stack([90 + y // 4, 140 + y // 5, 230 - y // 6], -1)
    img = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.polygon([(0, 300), (140, 170), (260, 260), (380, 150), (512, 280), (512, 384), (0, 384)], fill=(60, 110, 60))
    draw.ellipse([380, 40, 450, 110], fill=(250, 220, 120))
    path = OUT / "synthetic.png"
    img.save(path)
    return path


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder where possible."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def run(osdiff: str, *args: Path | str) -> None:
    """Print and run one osdiff command; if it fails (it has printed why), stop with its status."""
    args = [shown(a) if isinstance(a, Path) else a for a in args]
    print("$ osdiff", shlex.join(args), flush=True)
    code = subprocess.run([osdiff, *args]).returncode
    if code:
        raise SystemExit(code)


def main() -> int:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if source is not None and not source.is_file():
        print(f"demo: error: {source}: no such image file", file=sys.stderr)
        return 1
    OUT.mkdir(exist_ok=True)
    source = source or sample_image()
    original = OUT / f"{source.stem}{source.suffix}"
    if source.resolve() != original.resolve():
        shutil.copyfile(source, original)
    coded, decoded = OUT / f"{source.stem}.osd", OUT / f"{source.stem}.decoded.png"
    osdiff = str(Path(sys.executable).with_name("osdiff"))
    run(osdiff, "compress", original, "-o", coded, "--force")
    run(osdiff, "decompress", coded, "-o", decoded, "--force")
    run(osdiff, "info", coded)
    a = np.asarray(Image.open(original).convert("RGB"))
    b = np.asarray(Image.open(decoded).convert("RGB"))
    psnr = psnr_uint8(b, a)
    bpp = coded.stat().st_size * 8 / (a.shape[0] * a.shape[1])
    print(f"\noriginal:   {shown(original)}\ncompressed: {shown(coded)} ({coded.stat().st_size} bytes, {bpp:.4f} bpp)")
    print(f"decoded:    {shown(decoded)}\nPSNR:       {psnr:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
