"""Copy a finished `osdiff train` run into the package as osdiff-tiny (weights as float16).

    python scripts/ship_tiny.py ../runs/osdiff-tiny/model
"""
import shutil
import sys
from pathlib import Path

import osdiff
from osdiff.build import save_for_shipping

source = Path(sys.argv[1])
target = Path(__file__).resolve().parents[1] / "osdiff" / "weights" / "osdiff-tiny"
codec = osdiff.load(source)
if codec.config.model_name != "osdiff-tiny":
    sys.exit(f"{source} is model {codec.config.model_name!r}, not osdiff-tiny")
staging = target.with_name("osdiff-tiny.new")
shutil.rmtree(staging, ignore_errors=True)
save_for_shipping(codec, staging)
shutil.rmtree(target, ignore_errors=True)
staging.rename(target)
size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
print(f"wrote {target} ({size / 2**20:.1f} MiB), model hash {osdiff.load('osdiff-tiny').model_hash.hex()}")
