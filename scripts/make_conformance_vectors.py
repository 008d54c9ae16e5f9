"""Regenerate the conformance vectors of the shipped models (osdiff/conformance_vectors/).

Run only when the format or a shipped model changes on purpose, and commit the new vectors in the
same commit, with the reason in its message. Vectors of older format versions that are still
read stay (format-<v>/ folders); a model's folder is replaced only for the versions written now.

    .venv/bin/python scripts/make_conformance_vectors.py [--model osdiff-tiny ...] [--records-only]

Decoding runs with the AVX2 kernel pin (osdiff.kernels), which `osdiff conformance` applies too.
--records-only rewrites only the JSON records from the shipped `.osd` files (they stay byte for
byte), e.g. when the record format changes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from osdiff import kernels  # noqa: E402

kernels.pin("avx2")  # before torch's first op
from osdiff.conformance import VECTOR_ROOT, vector_files, write_record, write_vector  # noqa: E402
from osdiff.hub import available_models, load  # noqa: E402

# (name, width, height, quality: an int, "each" for every level, or None for the default)
CASES = [("q{q}-96x64", 96, 64, "each"), ("tiny-8x8", 8, 8, 1), ("odd-37x23", 37, 23, None),
         ("tiled-1100x1040", 1100, 1040, 1)]
# models with gain vectors (continuous quality) also get a quality between levels (format version 2)
FRACTIONAL_CASES = [("q2.5-96x64", 96, 64, 2.5)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="shipped model name (default: all)")
    parser.add_argument("--records-only", action="store_true", help="rewrite the JSON records of the shipped vectors only")
    args = parser.parse_args()
    print(f"CPU kernels {kernels.state()}")
    for model in args.model or available_models():
        pipe = load(model)
        if args.records_only:
            for path in vector_files(model):
                old = json.loads(path.with_suffix(".json").read_text())
                new = write_record(pipe, path, old["width"], old["height"])
                same = new["symbols_sha256"] == old["symbols_sha256"]
                print(f"{model}/{path.parent.name}/{path.stem}: symbols {'unchanged' if same else 'CHANGED'}")
            continue
        staging = Path(tempfile.mkdtemp())
        for name, width, height, quality in CASES + (FRACTIONAL_CASES if pipe.continuous_quality else []):
            levels = range(1, pipe.num_quality_levels + 1) if quality == "each" else [quality]
            for q in levels:
                path = write_vector(pipe, staging, name.format(q=q), width, height, q)
                print(f"{model}/{path.parent.name}/{path.name}: {path.stat().st_size} bytes")
        for written in (staging / model).iterdir():  # replace the format versions written now, keep others
            target = VECTOR_ROOT / model / written.name
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(written), target)
        shutil.rmtree(staging)
    return 0


if __name__ == "__main__":
    sys.exit(main())
