"""Copy a finished `osdiff train` run into the package under its model name (weights as float16).

    python scripts/ship_model.py ../runs/osdiff-tiny/model      # -> osdiff/weights/osdiff-tiny
    python scripts/ship_model.py ../runs/hific-tiny/model       # -> osdiff/weights/hific-tiny
"""
import shutil
import sys
from pathlib import Path

import osdiff
from osdiff.build import save_for_shipping

SHIPPABLE = ("osdiff-tiny", "hific-tiny")  # elic-tiny (38 MB in float16) is too large to ship

source = Path(sys.argv[1])
codec = osdiff.load(source)
name = codec.config.model_name
if name not in SHIPPABLE:
    sys.exit(f"{source} is model {name!r}; only {', '.join(SHIPPABLE)} ship inside the package")
target = Path(__file__).resolve().parents[1] / "osdiff" / "weights" / name
staging = target.with_name(f"{name}.new")
shutil.rmtree(staging, ignore_errors=True)
save_for_shipping(codec, staging)
shutil.rmtree(target, ignore_errors=True)
staging.rename(target)
size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
print(f"wrote {target} ({size / 2**20:.1f} MiB), model hash {osdiff.load(name).model_hash.hex()}")
