"""Write the untrained osdiff-tiny (random weights, seed 0) into osdiff/weights/osdiff-tiny.

Placeholder until the trained default model lands: it round-trips images through the real
code path, but its reconstructions are not meaningful.
    python scripts/build_untrained_tiny.py
"""
import shutil
from pathlib import Path

from osdiff.build import build_tiny, save_for_shipping

target = Path(__file__).resolve().parents[1] / "osdiff" / "weights" / "osdiff-tiny"
shutil.rmtree(target, ignore_errors=True)
save_for_shipping(build_tiny(seed=0), target)
print(f"wrote {target}")
