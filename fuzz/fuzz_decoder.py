"""Coverage-guided fuzzing (atheris / libFuzzer) of the `.osd` parser, `osdiff info`'s
formatting and the full decoder of the shipped osdiff-tiny.

    pip install atheris
    python fuzz/fuzz_decoder.py -runs=100000 -rss_limit_mb=6144 -timeout=60 -print_final_stats=1 CORPUS_DIR

Every input must end in a decoded image or an OSDiffError; any other exception, a crash, a
hang (-timeout) or memory over -rss_limit_mb is reported by libFuzzer as a finding. The first
input byte picks how the rest is used, so that mutations reach past the CRC32:
  0: the bytes as a file;  1: the bytes + a correct CRC32;  2: a valid seed file with the bytes
  written over part of it, + a correct CRC32.
Declared image sizes are capped at 65536 pixels here (BitstreamLimits) so each decode takes
milliseconds; the parser's rejection of huge sizes is tested separately (tests/test_bitstream.py).
"""
from __future__ import annotations

import struct
import sys
import warnings
import zlib

import atheris

with atheris.instrument_imports(include=["osdiff"]):
    import numpy as np

    import osdiff
    from osdiff.config import BitstreamLimits
    from osdiff.entropy.bitstream import parse
    from osdiff.errors import OSDiffError

warnings.filterwarnings("ignore")
LIMITS = BitstreamLimits(max_side=1024, max_pixels=65536)
CODEC = osdiff.load("osdiff-tiny")
CODEC.limits = LIMITS
_rng = np.random.default_rng(0)
SEEDS = [CODEC.compress((_rng.random((h, w, 3)) * 255).astype(np.uint8), quality=q)
         for (h, w) in ((8, 8), (17, 30), (64, 48)) for q in (*range(1, CODEC.num_quality_levels + 1), 1.5)]


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


def make_file(data: bytes) -> bytes:
    if not data:
        return data
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        return rest
    if mode == 1:
        return _with_crc(rest)
    seed = SEEDS[rest[0] % len(SEEDS)] if rest else SEEDS[0]
    body = bytearray(seed[:-4])
    at = (rest[1] * 256 + rest[2]) % len(body) if len(rest) > 2 else 0
    patch = rest[3:]
    body[at:at + len(patch)] = patch
    return _with_crc(bytes(body))


def test_one_input(data: bytes) -> None:
    file = make_file(data)
    try:
        header, strings = parse(file, LIMITS)
        header.as_dict(), len(file) * 8 / (header.width * header.height), [len(s) for s in strings]  # what `osdiff info` prints
    except OSDiffError:
        pass
    try:
        image = CODEC.decompress(file)
    except OSDiffError:
        return
    if image.mode != "RGB" or image.size != (header.width, header.height):
        raise AssertionError(f"decoded {image.mode} {image.size} for a {header.width}x{header.height} file")


def main() -> None:
    import os

    corpus = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus and not os.path.isfile(corpus):  # a corpus folder (a file argument is an input to re-run)
        os.makedirs(corpus, exist_ok=True)
        for i, seed in enumerate(SEEDS):  # one input per mode around each seed
            for mode in (0, 1, 2):
                with open(os.path.join(corpus, f"seed-{i}-{mode}"), "wb") as f:
                    f.write(bytes([mode]) + (seed if mode == 0 else seed[:-4] if mode == 1 else bytes([i, 0, 40]) + seed[40:60]))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
