"""Large images: overlapping tiles with blending keep memory bounded and show no seams."""
from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from osdiff.config import TilingConfig
from osdiff.evaluation.metrics import psnr
from osdiff.tiling import axis_tiles, run_tiled


@pytest.mark.parametrize("size", [1, 100, 128, 129, 300, 384, 512, 1000])
@pytest.mark.parametrize("overlap", [8, 16])
def test_tiles_cover_every_position_with_the_overlap_asked(size, overlap):
    spans = axis_tiles(size, 128, overlap, 8)
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    assert starts[0] == 0 and ends[-1] == size and all(s % 8 == 0 for s in starts) and starts == sorted(set(starts))
    assert all(ends[i] - starts[i + 1] >= overlap for i in range(len(spans) - 1))  # every overlap blends
    assert all(e - s <= 128 for s, e in spans[:-1]) and ends[-1] - starts[-1] <= 128 + 7
    # as few tiles as can cover the size, all of one length: no tile mostly repeats its neighbour
    assert len(spans) == max(1, -(-(size - overlap) // (128 - overlap)))
    assert len({e - s for s, e in spans[:-1]}) <= 1


def test_the_12_megapixel_mosaic_is_decoded_with_little_overlap():
    """4096x3072 (latent 512x384) at the default tiling: 5 x 4 tiles, ~1.2x the pixels (the
    tiles of a fixed 128-latent stride, last one flush with the edge, made that 1.67x)."""
    t = TilingConfig()
    cols, rows = axis_tiles(512, t.tile, t.overlap, t.align), axis_tiles(384, t.tile, t.overlap, t.align)
    assert (len(cols), len(rows)) == (5, 4)
    work = sum(e - s for s, e in cols) * sum(e - s for s, e in rows) / (512 * 384)
    assert work < 1.2


@pytest.mark.parametrize("scale", [1, 8, Fraction(1, 8)])
def test_blending_of_exact_tiles_is_exact(scale):
    x = torch.rand(1, 3, 200, 328)

    def fn(t):
        if scale == 8:
            return F.interpolate(t, scale_factor=8, mode="nearest")
        if scale == Fraction(1, 8):
            return F.avg_pool2d(t, 8)
        return t * 2

    whole = fn(x)
    tiled = run_tiled(fn, [x], scale, tile=64, overlap=16, align=8)
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-5)


@pytest.fixture(scope="module")
def shipped():
    import osdiff

    return osdiff.load("osdiff-tiny")


def test_tiled_decode_has_no_seams(shipped):
    y, x = np.mgrid[0:384, 0:520]
    img = np.stack([128 + 90 * np.sin(x / 23.0), 128 + 90 * np.cos(y / 17.0), (x + y) % 256 * 0.8], -1).astype(np.uint8)
    data = shipped.compress(img, quality=3)
    whole = shipped.decompress_tensor(data).image
    try:
        shipped.tiling = TilingConfig(tile=16, overlap=8, align=8)  # 128-px tiles: 3 x 5 of them here
        tiled = shipped.decompress_tensor(data).image
    finally:
        shipped.tiling = TilingConfig()
    assert tiled.shape == whole.shape
    # the shipped v2 decoder's trunk (TAEF2's) has GroupNorm over what it decodes, so each tile is
    # normalised with its own statistics: close to the untiled decode (30.3 dB at these tiny 128-px
    # tiles; the default tile is 1024 px), not equal to it
    assert psnr(tiled, whole) > 28
    # no seam: the difference to the untiled decode is not concentrated on tile borders
    diff = (tiled - whole).abs().mean(dim=(0, 1, 2))  # per column
    borders = [c for s, _ in axis_tiles(whole.shape[-1] // 8, 16, 8, 8)[1:] for c in range(8 * s - 2, 8 * s + 2)]
    assert diff[borders].mean() < 3 * diff.mean() + 1e-3


LARGE = r"""
import re, sys, time
import numpy as np
import osdiff
codec = osdiff.load("osdiff-tiny")
rng = np.random.default_rng(0)
img = rng.integers(0, 20, (3000, 4000, 3), dtype=np.uint8)  # built in uint8: no big temporaries
img[:, :, 0] += np.arange(4000, dtype=np.uint8)[None, :] % 200
img[:, :, 1] += np.arange(3000, dtype=np.uint8)[:, None] % 200
def peak_mib():  # this process's own high-water mark (ru_maxrss would carry the parent's over exec)
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
base = peak_mib()
t0 = time.perf_counter()
data = codec.compress(img, quality=1)
t1 = time.perf_counter()
out = codec.decompress(data)
t2 = time.perf_counter()
assert out.size == (4000, 3000)
print(f"{len(data)} bytes, compress {t1 - t0:.1f} s, decompress {t2 - t1:.1f} s, peak RSS {peak_mib():.0f} MiB (after loading {base:.0f} MiB)")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_twelve_megapixels_in_bounded_memory():
    """4000x3000 round trip with the shipped model; untiled this needs about 4 GiB to decode."""
    run = subprocess.run([sys.executable, "-c", LARGE], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    peak_mib = float(run.stdout.split("peak RSS ")[1].split(" MiB")[0])
    loaded_mib = float(run.stdout.split("after loading ")[1].split(" MiB")[0])
    print(run.stdout)
    # what coding adds above the loaded model and the image (the loaded size itself varies by
    # environment: 959 MiB here, 1197 MiB in a clean-clone CI run): v2 with channels-last
    # networks (TAEF2 encoder: 64 channels at full resolution per tile) adds 1.80-1.86 GiB
    assert peak_mib - loaded_mib < 2048
