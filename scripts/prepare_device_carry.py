"""Make .carry/ (git-ignored), what scripts/device_train.sh needs on a device machine that has
its own python3 + torch and no package registry: wheels for the packages it lacks (Python 3.12,
manylinux x86-64), a training subset of ../shared/data kept small enough that the working tree
plus .carry stays under the device tool's 64 MiB, and the TAEF2 pair.

    .venv/bin/python scripts/prepare_device_carry.py [--train-images 200]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ["diffusers==0.42.1", "compressai==1.2.8", "piq==0.8.0", "pytorch-msssim==1.0.0", "importlib_metadata", "zipp"]
PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--train-images", type=int, default=200, help="CBSD432 photos (JPEG, as stored)")
    parser.add_argument("--extra-images", type=int, default=20, help="from each of urban100-subset and wikipedia-photos")
    parser.add_argument("--val-images", type=int, default=8, help="CBSD68 photos")
    args = parser.parse_args()
    shared, carry = Path(args.shared), ROOT / ".carry"
    if carry.exists():
        shutil.rmtree(carry)
    (carry / "data" / "train").mkdir(parents=True)
    (carry / "data" / "val").mkdir(parents=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platform_args, "-d", str(carry / "wheels"), *WHEELS], check=True)
    images = shared / "images"
    for f in sorted((images / "cbsd432").glob("*.jpg"))[: args.train_images]:
        shutil.copy(f, carry / "data" / "train" / f.name)
    for sub in ("urban100-subset", "wikipedia-photos"):  # resized to 768 px, JPEG q92
        for f in sorted((images / sub).glob("*.png"))[: args.extra_images]:
            im = Image.open(f).convert("RGB")
            scale = 768 / max(im.size)
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            im.save(carry / "data" / "train" / f"{sub[:5]}-{f.stem}.jpg", quality=92)
    for f in sorted((images / "cbsd68").glob("*.png"))[: args.val_images]:
        shutil.copy(f, carry / "data" / "val" / f.name)
    shutil.copytree(shared / "weights" / "taesd", carry / "taesd", ignore=shutil.ignore_patterns("*.md"))
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    print(f"{carry}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
