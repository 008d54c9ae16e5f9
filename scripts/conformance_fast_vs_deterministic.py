"""How far `--fast` decoding moves from the default deterministic mode on this machine, per
conformance vector: largest pixel difference, how many values differ, the PSNR change, and
whether the entropy-decoded symbols are equal (they must be). The figures behind
osdiff.conformance.PSNR_TOLERANCE_DB (docs/bitstream.md).

    .venv/bin/python scripts/conformance_fast_vs_deterministic.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from osdiff.config import ComputeConfig  # noqa: E402
from osdiff.conformance import decode_recording, psnr_db, source_image, vector_files  # noqa: E402
from osdiff.hub import available_models, load  # noqa: E402


def main() -> int:
    worst_level, worst_db, symbols_differ = 0, 0.0, 0
    for model in available_models():
        pipe = load(model)
        for path in vector_files(model):
            record = json.loads(path.with_suffix(".json").read_text())
            pipe.compute = ComputeConfig(deterministic=True)
            a, sym_a = decode_recording(pipe, path.read_bytes())
            pipe.compute = ComputeConfig(deterministic=False)
            b, sym_b = decode_recording(pipe, path.read_bytes())
            level = int(np.abs(a.astype(int) - b.astype(int)).max())
            src = source_image(record["width"], record["height"])
            delta = abs(psnr_db(a, src) - psnr_db(b, src))
            same = len(sym_a) == len(sym_b) and all(np.array_equal(x, y) for x, y in zip(sym_a, sym_b))
            worst_level, worst_db, symbols_differ = max(worst_level, level), max(worst_db, delta), symbols_differ + (not same)
            print(f"{model}/{path.stem}: max |diff| {level}, values differing {int((a != b).sum())}/{a.size}, "
                  f"PSNR change {delta:.5f} dB, symbols equal {same}")
    print(f"worst: {worst_level} level(s), {worst_db:.5f} dB; vectors with different symbols: {symbols_differ}")
    return 1 if symbols_differ else 0


if __name__ == "__main__":
    sys.exit(main())
