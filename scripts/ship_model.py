"""Copy a finished `osdiff train` run into the package under its model name (weights as float16).

    python scripts/ship_model.py ../runs/osdiff-tiny/model      # -> osdiff/weights/osdiff-tiny
    python scripts/ship_model.py ../runs/hific-tiny/model       # -> osdiff/weights/hific-tiny
    python scripts/ship_model.py ../runs/cpu2/levels/model --default-quality 3 --pad-multiple 32 --mean-colour
    python scripts/ship_model.py ../runs/v3/snapshots/model-562-taef2dec --unet-max-quality 4   # v3.2
    python scripts/ship_model.py osdiff/weights/osdiff-tiny --realism 0.5,0.75,0.75,0.5,1   # per level
"""
import argparse
import shutil
import sys
from pathlib import Path

import osdiff
from osdiff.build import save_for_shipping

SHIPPABLE = ("osdiff-tiny", "hific-tiny")  # elic-tiny (38 MB in float16) is too large to ship

parser = argparse.ArgumentParser(description="Copy a finished run's model into the package (float16).")
parser.add_argument("model", help="the run's model folder")
parser.add_argument("--default-quality", type=int, help="the level `osdiff compress` uses without -q (else the run's own)")
parser.add_argument("--pad-multiple", type=int, help="pad images to a multiple of this many pixels (osdiff models; "
                    "default: the compressor's full multiple)")
parser.add_argument("--mean-colour", action="store_true", help="store the image's mean colour in each file (3 bytes) "
                    "and match it when decoding (osdiff models)")
parser.add_argument("--unet-max-quality", type=float, help="files of a higher quality decode without the UNet step "
                    "(osdiff models; `osdiff decompress --steps` still overrides)")
parser.add_argument("--realism", help="how much of the UNet step's change to the hint decoding keeps (osdiff models): "
                    "one number from 0 to 1, or one per quality level, comma-separated")
args = parser.parse_args()
source = Path(args.model)
codec = osdiff.load(source)
if args.default_quality is not None:
    if not 1 <= args.default_quality <= codec.num_quality_levels:
        sys.exit(f"--default-quality must be 1..{codec.num_quality_levels}")
    codec.register_to_config(default_quality=args.default_quality)
if args.pad_multiple is not None:
    codec.register_to_config(pad_multiple=args.pad_multiple)
    codec.pad_multiple  # noqa: B018  (raises if the networks cannot take it)
if args.mean_colour:
    codec.register_to_config(mean_colour=True)
if args.unet_max_quality is not None:
    if not 1 <= args.unet_max_quality <= codec.num_quality_levels:
        sys.exit(f"--unet-max-quality must be 1..{codec.num_quality_levels}")
    codec.register_to_config(unet_max_quality=args.unet_max_quality)
if args.realism is not None:
    from osdiff.config import check_realism, realism_as_config, realism_at

    try:
        values = [float(v) for v in args.realism.split(",")]
        realism = check_realism(values[0] if len(values) == 1 else values, "--realism")
        realism_at(realism, 1, codec.num_quality_levels)  # one value per level
    except ValueError as exc:
        sys.exit(str(exc))
    codec.register_to_config(realism=realism_as_config(realism))
name = codec.config.model_name
if name not in SHIPPABLE:
    sys.exit(f"{source} is model {name!r}; only {', '.join(SHIPPABLE)} ship inside the package")
target = Path(__file__).resolve().parents[1] / "osdiff" / "weights" / name
staging = target.with_name(f"{name}.new")
shutil.rmtree(staging, ignore_errors=True)
save_for_shipping(codec, staging)
# licence notices (e.g. vae/LICENSE-TAESD.txt for TAEF2's layers) of the run folder or, failing
# that, of the shipped folder this replaces: weights change, their origin does not
for notice in [*source.glob("*/LICENSE*"), *target.glob("*/LICENSE*")]:
    kept = staging / notice.parent.name / notice.name
    if kept.parent.is_dir() and not kept.exists():
        shutil.copy2(notice, kept)
        print(f"kept the notice {notice.parent.name}/{notice.name}")
shutil.rmtree(target, ignore_errors=True)
staging.rename(target)
size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
print(f"wrote {target} ({size / 2**20:.1f} MiB), model hash {osdiff.load(name).model_hash.hex()}")
