"""Make .carry/ (git-ignored), what scripts/device_train.sh needs on a device machine that has
its own python3 + torch and no package registry: wheels for the packages it lacks (Python 3.12,
manylinux x86-64), the LPIPS backbone (AlexNet, float16, osdiff-cache/), validation photos and
as many training photos as fit: the device tool sends
the working tree plus .carry, at most 64 MiB, so training photos are added (CBSD432, Urban100 and
Wikipedia photos in turn, all resized to a --short-side px shorter side as JPEG) until the total
reaches --budget-mib. The TAEF2 teacher travels inside the package.

    .venv/bin/python scripts/prepare_device_carry.py [--budget-mib 60] [--init-model DIR] [--init-vae DIR]

The device tool refused 63.5 MiB by this count and took 60.0 (it counts more than the files'
bytes). The working tree (49 MiB) and the wheels, backbone and validation photos (12 MiB) leave
little for photos: on 2026-12-04 the files no GPU run needs (tests/fixtures/official_tiny/*.ckpt,
osdiff/weights/hific-tiny, 16 MiB) were moved out of the checkout for the one call and back after
it, and 480 photos fit.

--init-model: a v2/v3 model folder trained elsewhere (e.g. on the CPU, ../runs/cpu2/...), carried
as float16 to .carry/init-model; device_train.py then continues from it. --init-vae: an autoencoder
folder (or a model folder's vae/), carried as float16 to .carry/init-vae, that replaces the base
model's: e.g. the slim student encoder distilled on the CPU (`osdiff export ../runs/v3/encoder-tail
-o DIR --base osdiff/weights/osdiff-tiny`), which device_train.py then trains with the codec.
"""
from __future__ import annotations

import argparse
import io
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ["diffusers==0.42.1", "compressai==1.2.8", "piq==0.8.0", "pytorch-msssim==1.0.0", "importlib_metadata", "zipp"]
PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def tree_bytes() -> int:
    """What the device tool sends besides .carry: tracked files and untracked, not ignored ones."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if p and (ROOT / p).is_file())


def resized_jpeg(path: Path, short_side: int, quality: int) -> bytes:
    """The photo as a JPEG at most `short_side` px on its shorter side (smaller photos, more of
    them; training crops of 256 px still fit)."""
    im = Image.open(path).convert("RGB")
    scale = short_side / min(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--budget-mib", type=float, default=60.0, help="working tree + .carry")
    parser.add_argument("--val-images", type=int, default=2, help="CBSD68 photos (in-training validation, a guide)")
    parser.add_argument("--short-side", type=int, default=272, help="training photos: shorter side (px) at most")
    parser.add_argument("--jpeg-quality", type=int, default=85, help="training photos: JPEG quality")
    parser.add_argument("--init-model", default=None, help="a v2 model folder for device_train.py to continue")
    parser.add_argument("--init-vae", default=None,
                        help="an autoencoder folder, or a model folder's vae/, that replaces the base model's in "
                             "device_train.py (e.g. one encoding with the slim student encoder, then trained with the codec)")
    args = parser.parse_args()
    shared, carry = Path(args.shared), ROOT / ".carry"
    if carry.exists():
        shutil.rmtree(carry)
    (carry / "data" / "train").mkdir(parents=True)
    (carry / "data" / "val").mkdir(parents=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platform_args, "-d", str(carry / "wheels"), *WHEELS], check=True)
    if args.init_model:
        import osdiff
        from osdiff.build import save_for_shipping

        save_for_shipping(osdiff.load(args.init_model), carry / "init-model")
    if args.init_vae:  # float16, as the model ships (~5 MB)
        from osdiff.models.taesd import TAESDAutoencoder

        vae_dir = Path(args.init_vae) / "vae" if (Path(args.init_vae) / "model_index.json").is_file() else Path(args.init_vae)
        TAESDAutoencoder.from_pretrained(vae_dir).half().save_pretrained(carry / "init-vae")
    # the LPIPS backbone the v3 objective trains with: AlexNet's features in float16 (4.9 MB;
    # VGG16's, 29 MB in float16, do not fit beside the working tree), found through OSDIFF_CACHE
    from safetensors.torch import load_file, save_file

    from osdiff.quality.backbones import ALEXNET, backbone_file

    backbones = carry / "osdiff-cache" / "backbones"
    backbones.mkdir(parents=True)
    alex = load_file(str(backbone_file(ALEXNET)))
    save_file({k: v.half().contiguous() for k, v in alex.items()}, str(backbones / f"{ALEXNET.name}.safetensors"))
    images = shared / "images"
    for f in sorted((images / "cbsd68").glob("*.png"))[: args.val_images]:
        shutil.copy(f, carry / "data" / "val" / f.name)
    used = tree_bytes() + sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    budget = int(args.budget_mib * 2**20)
    sources = [  # (name prefix, photo) of each folder, taken in turn
        [("", f) for f in sorted((images / "cbsd432").glob("*.jpg"))],
        [("urban-", f) for f in sorted((images / "urban100-subset").glob("*.png"))],
        [("wiki-", f) for f in sorted((images / "wikipedia-photos").glob("*.png"))],
    ]
    count = 0
    for prefix, f in (item for group in itertools.zip_longest(*sources) for item in group if item):
        name, data = f"{prefix}{f.stem}.jpg", resized_jpeg(f, args.short_side, args.jpeg_quality)
        if used + len(data) > budget:
            break
        (carry / "data" / "train" / name).write_bytes(data)
        used, count = used + len(data), count + 1
    print(f"{count} training photos; working tree + .carry = {used / 2**20:.1f} MiB (budget {args.budget_mib} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
