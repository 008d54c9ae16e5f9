"""Rate control: continuous quality (gain interpolation, format version 2) and target sizes."""
from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import torch

import osdiff
from osdiff import OSDiffError, OSDiffWarning
from osdiff.entropy.bitstream import FORMAT_VERSION, FRACTIONAL_VERSION, OSDHeader, pack, parse
from osdiff.entropy.gains import interpolate_gains
from osdiff.rate import parse_size, search_quality, target_size


# ---- the format ---------------------------------------------------------------------------
def test_integer_quality_writes_version_1_and_fractional_version_2():
    whole = pack(OSDHeader("m", b"\x01" * 8, 3, 56, 40, 8, 24), [b"abc"])
    assert whole[4] == FORMAT_VERSION and whole[5] == 3
    # the version-1 layout an older reader parses: magic, version, quality byte, name length
    assert struct.unpack_from(">4sBBB", whole) == (b"\x89OSD", 1, 3, 1)
    frac = pack(OSDHeader("m", b"\x01" * 8, 2.5, 56, 40, 8, 24), [b"abc"])
    assert frac[4] == FRACTIONAL_VERSION and struct.unpack_from(">H", frac, 5)[0] == 640
    assert len(frac) == len(whole) + 1
    for data, quality, version in ((whole, 3, 1), (frac, 2.5, 2)):
        header, strings = parse(data)
        assert header.quality == quality and type(header.quality) is type(quality)
        assert header.version == version and header.as_dict()["format_version"] == version and strings == [b"abc"]


@pytest.mark.parametrize("quality", [1 + 1 / 256, 2.5, 3.99609375, 200.25])
def test_fractional_quality_round_trips_exactly(quality):
    header = OSDHeader("osdiff-tiny", b"\x02" * 8, quality, 7, 9, 57, 55)
    assert parse(pack(header, [b"", b"x"]))[0] == header


def test_quality_not_on_the_grid_or_below_one_is_refused():
    for bad in (2.001, 0.5, float("nan"), "2"):
        with pytest.raises(OSDiffError, match="quality"):
            pack(OSDHeader("m", b"\x00" * 8, bad, 4, 4, 0, 0), [b"x"])


def _recrc(body: bytes) -> bytes:
    import zlib

    return body + struct.pack(">I", zlib.crc32(body))


def test_version_2_file_with_whole_or_sub_one_quality_is_corrupt():
    body = bytearray(pack(OSDHeader("m", b"\x00" * 8, 2.5, 4, 4, 0, 0), [b"x"])[:-4])
    body[5:7] = struct.pack(">H", 512)  # quality 2.0 in version 2: not what a writer makes
    with pytest.raises(OSDiffError, match="whole quality"):
        parse(_recrc(bytes(body)))
    body[5:7] = struct.pack(">H", 255)  # 0.996
    with pytest.raises(OSDiffError, match="below 1"):
        parse(_recrc(bytes(body)))


def test_every_bit_flip_of_a_version_2_file_is_caught():
    data = pack(OSDHeader("m", b"\x00" * 8, 1.25, 30, 20, 2, 12), [b"ab", b"\x00\xff" * 4])
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 1
        with pytest.raises(OSDiffError):
            parse(bytes(flipped))


# ---- gain interpolation ---------------------------------------------------------------------
def test_interpolated_gains_are_geometric_on_the_grid_and_between_levels():
    low = torch.tensor([0.5, 2.0, 1.0, -0.25, 0.7, 3.0])
    high = torch.tensor([2.0, 0.5, 1.0, -1.0, -0.7, 3.0])
    for k in (1, 64, 128, 200, 255):
        t = k / 256
        g = interpolate_gains(low, high, k)
        assert g.dtype == torch.float32
        grid = g.double() * 2**16
        assert torch.equal(grid, grid.round())  # multiples of 2^-16, held exactly in float32
        a, b = low.double(), high.double()
        geometric = a.abs() ** (1 - t) * b.abs() ** t * a.sign()
        expected = torch.where(a * b > 0, geometric, a + (b - a) * t)  # linear across a sign change
        assert torch.allclose(g.double(), expected, atol=2**-17 + 1e-12, rtol=0)
    assert interpolate_gains(low, high, 128)[0].item() == 1.0  # sqrt(0.5 * 2)
    with pytest.raises(ValueError):
        interpolate_gains(low, high, 0)


def test_gains_rise_monotonically_with_the_fraction():
    low, high = torch.linspace(0.3, 1.1, 50), torch.linspace(0.9, 4.0, 50)
    rows = torch.stack([interpolate_gains(low, high, k) for k in range(1, 256)])
    assert (rows.diff(dim=0) >= 0).all() and (rows[0] >= low).all() and (rows[-1] <= high).all()


def test_whole_levels_use_exactly_the_stored_gain_vectors(tiny_codec):
    comp = tiny_codec.compressor
    for level in range(comp.config.num_quality_levels):
        for got, stored in zip(comp.coding_gains(level), (comp.y_gain, comp.z_gain, comp.y_gain_inv, comp.z_gain_inv)):
            assert torch.equal(got.flatten(), stored[level])
        assert all(torch.equal(a, b) for a, b in zip(comp.coding_gains(float(level)), comp.coding_gains(level)))
    between = comp.coding_gains(1.5)
    assert all(x.shape == y.shape for x, y in zip(between, comp.coding_gains(1)))
    for bad in (-0.5, comp.config.num_quality_levels - 0.5, 1.001):
        with pytest.raises(ValueError):
            comp.coding_gains(bad)


# ---- target-size search (a model of file size against quality) ------------------------------
def _fake(sizes_at):
    calls = []

    def encode(q):
        calls.append(q)
        return bytes(sizes_at(q))

    return encode, calls


@pytest.mark.parametrize("target", [700, 1234, 2000, 3999])
def test_search_finds_the_highest_fitting_quality_in_few_encodes(target):
    size = lambda q: int(500 * 2 ** (q - 1) * 1.0)  # noqa: E731  500 .. 4000 bytes over 1 .. 4
    encode, calls = _fake(size)
    result = search_quality(encode, 4, True, target)
    assert result.fits and len(result.data) <= target and result.encodes == len(calls) <= 8
    assert len(set(calls)) == len(calls) and calls[:2] == [4, 1]
    assert result.quality in calls and len(result.data) == size(result.quality)
    assert len(result.data) >= 0.9 * target  # within 10 % of the budget
    # nothing coded above the result fits: the search found the top of what fits
    assert all(size(q) > target for q in calls if q > result.quality)


def test_search_ends_at_once_when_the_top_fits_or_the_bottom_does_not():
    encode, calls = _fake(lambda q: int(100 * q))
    r = search_quality(encode, 4, True, 400)
    assert (r.quality, r.encodes, r.fits, calls) == (4, 1, True, [4])
    encode, calls = _fake(lambda q: int(100 * q))
    r = search_quality(encode, 4, True, 99)
    assert (r.quality, r.encodes, r.fits, len(r.data), calls) == (1, 2, False, 100, [4, 1])


def test_search_without_gains_picks_the_best_whole_level():
    sizes = {1: 100, 2: 180, 3: 260, 4: 400, 5: 600}
    for target, best in ((150, 1), (180, 2), (399, 3), (10_000, 5)):
        encode, calls = _fake(lambda q: sizes[q])
        r = search_quality(encode, 5, False, target)
        assert r.quality == best and r.fits and all(isinstance(q, int) for q in calls)
        assert r.encodes <= 4


def test_search_respects_the_encode_budget():
    from osdiff.config import RateControlConfig

    encode, calls = _fake(lambda q: int(1000 * q + 7 * np.sin(q * 50)))  # noisy, nearly linear
    r = search_quality(encode, 4, True, 2500, RateControlConfig(max_encodes=3, tolerance=0))
    assert r.encodes == len(calls) == 3 and r.fits and len(r.data) <= 2500


# ---- targets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [("20kB", 20_000), ("20 KiB", 20_480), ("1.5MB", 1_500_000), ("512", 512),
                                         ("300b", 300), ("2mib", 2 * 2**20), ("0.5kB", 500)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "", "-5kB", "0", "0.1", "10 kilobytes", "1e3", "5 kB extra", "nan"])
def test_parse_size_rejects(text):
    with pytest.raises(OSDiffError, match="size"):
        parse_size(text)


def test_target_size_in_bytes_and_bpp():
    assert target_size(100, 80, target_bpp=0.5) == 500
    assert target_size(100, 80, target_bytes=20) == 20
    for bad in ({"target_bpp": 0}, {"target_bpp": -1.0}, {"target_bpp": float("nan")}, {"target_bytes": 0},
                {"target_bytes": -3}, {"target_bytes": 2.5}, {"target_bytes": "20kB"}, {}, {"target_bpp": 1, "target_bytes": 2}):
        with pytest.raises(OSDiffError):
            target_size(100, 80, **bad)


# ---- the codec -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spread_codec(tiny_codec_folder):
    """The tiny random-weight model with its y gains spread x10 (4 .. 40) over the levels, so
    that, untrained, its file size still grows steadily with the quality."""
    import math

    codec = osdiff.load(tiny_codec_folder)
    comp = codec.compressor
    gains = torch.exp(torch.linspace(math.log(4), math.log(40), comp.config.num_quality_levels))[:, None]
    with torch.no_grad():
        comp.y_gain.copy_(gains.expand_as(comp.y_gain))
        comp.y_gain_inv.copy_((1 / gains).expand_as(comp.y_gain_inv))
    codec._model_hash = None
    return codec


@pytest.fixture(scope="module")
def textured() -> np.ndarray:
    """A 96x128 RGB image with gradients and noise."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:96, 0:128]
    img = np.stack([np.sin(x / 9) * 90 + 128, np.cos(y / 7) * 90 + 128, (x + y) % 256], -1) + rng.normal(0, 12, (96, 128, 3))
    return np.clip(img, 0, 255).astype(np.uint8)

def test_fractional_quality_round_trips_and_sits_between_its_levels(tiny_codec, photo):
    sizes = {q: len(tiny_codec.compress(photo, quality=q)) for q in (2, 3)}
    result = tiny_codec.encode(photo, quality=2.5)
    header, _ = parse(result.data)
    assert (header.quality, header.version, result.quality, result.encodes) == (2.5, 2, 2.5, 1)
    assert sizes[2] - 8 <= len(result.data) <= sizes[3] + 8
    assert tiny_codec.decompress(result.data).size == (photo.shape[1], photo.shape[0])
    assert tiny_codec.compress(photo, quality=2.5) == result.data  # deterministic
    # rounded to the 1/256 grid the header stores
    assert parse(tiny_codec.compress(photo, quality=2.5 + 1e-4))[0].quality == 2.5
    assert parse(tiny_codec.compress(photo, quality=2 + 1e-4))[0].version == FORMAT_VERSION


def test_decoder_reproduces_encoder_latent_at_a_fractional_quality(tiny_codec, photo):
    from osdiff.imageio import to_tensor
    from osdiff.models.autoencoder import encode_latent

    x = to_tensor(photo)
    side = tiny_codec.min_padded_side
    x = torch.nn.functional.pad(x, (0, side - x.shape[-1], 0, side - x.shape[-2]), mode="replicate")
    latent = encode_latent(tiny_codec.vae, x * 2 - 1)
    for level in (0.25, 1 + 77 / 256, 2.5):
        coded = tiny_codec.compressor.compress(latent, level)
        hint = tiny_codec.compressor.decompress(coded["strings"], tuple(latent.shape[-2:]), level)
        assert torch.equal(hint, coded["hint"])


def test_target_bytes_lands_within_ten_percent(spread_codec, textured):
    codec, top = spread_codec, spread_codec.num_quality_levels
    lo, hi = (len(codec.compress(textured, quality=q)) for q in (1, top))
    assert hi > 2 * lo
    for target in (lo + (hi - lo) // 3, (lo + hi) // 2):
        result = codec.encode(textured, target_bytes=target)
        assert result.fits and 0.9 * target <= len(result.data) <= target and 3 <= result.encodes <= 8
        assert parse(result.data)[0].quality == result.quality and 1 < result.quality < top
        assert codec.compress(textured, target_bytes=target) == result.data  # deterministic
        assert codec.compress(textured, quality=result.quality) == result.data
    bpp = target * 8 / (textured.shape[0] * textured.shape[1])
    assert codec.encode(textured, target_bpp=bpp).data == result.data
    best = codec.encode(textured, target_bytes=hi + 100)
    assert best.quality == top and best.encodes == 1 and best.fits


def test_unreachable_target_warns_or_fails_when_strict(spread_codec, textured):
    lowest = spread_codec.compress(textured, quality=1)
    target = len(lowest) - 1
    with pytest.warns(OSDiffWarning, match="lowest quality"):
        result = spread_codec.encode(textured, target_bytes=target)
    assert (result.data, result.fits, result.quality, result.encodes) == (lowest, False, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OSDiffWarning)  # strict: an error, not a warning
        with pytest.raises(OSDiffError, match="over the target"):
            spread_codec.encode(textured, target_bytes=target, strict=True)


def test_bad_targets_are_refused(tiny_codec, photo):
    header = tiny_codec.min_file_bytes()
    assert header == len(pack(OSDHeader(tiny_codec.config.model_name, b"\x00" * 8, 1, 1, 1, 0, 0), [b""] * tiny_codec.num_strings()))
    for kwargs in ({"target_bytes": 0}, {"target_bytes": -10}, {"target_bytes": header - 1}, {"target_bpp": 0.0},
                   {"target_bpp": -0.1}, {"target_bytes": "abc"}, {"target_bytes": 100, "target_bpp": 0.1},
                   {"target_bytes": 100, "quality": 2}):
        with pytest.raises(OSDiffError, match="target|size|bytes|bpp"):
            tiny_codec.encode(photo, **kwargs)


def test_baseline_has_whole_levels_only(tmp_path, photo):
    from osdiff import BaselinePipeline, LearnedImageCodec

    torch.manual_seed(0)
    codec = BaselinePipeline(LearnedImageCodec(architecture="mean-scale-hyperprior", N=8, M=8, num_rates=3), model_name="b")
    assert not codec.continuous_quality
    with pytest.raises(OSDiffError, match="integer"):
        codec.compress(photo, quality=1.5)
    sizes = [len(codec.compress(photo, quality=q)) for q in (1, 2, 3)]
    result = codec.encode(photo, target_bytes=max(sizes) + 10)
    assert result.quality == 3 and isinstance(result.quality, int)
    # a fractional file is refused before decoding by a model without gains
    header, strings = parse(codec.compress(photo, quality=2))
    frac = pack(OSDHeader(header.model_name, header.model_hash, 1.5, header.width, header.height, header.pad_w, header.pad_h), strings)
    with pytest.raises(OSDiffError, match="quality must be an integer"):
        codec.decompress(frac)


def test_integer_quality_files_are_those_of_the_stored_vector_path(tiny_codec, photo):
    """Byte-identical to osdiff before continuous quality: the strings of the stored gain
    vectors (`_gains`, the only path before), in a version-1 container laid out by hand."""
    import zlib

    from osdiff.imageio import pad_right_bottom, to_tensor

    x = to_tensor(photo)
    h, w = x.shape[-2:]
    pad_w, pad_h = tiny_codec.padded_side(w) - w, tiny_codec.padded_side(h) - h
    with tiny_codec.coding_context(), torch.inference_mode():
        latent = tiny_codec.encode_image(pad_right_bottom(x, pad_w, pad_h) * 2 - 1)
        y = tiny_codec.compressor.g_a(latent)
        for q in range(1, tiny_codec.num_quality_levels + 1):
            with tiny_codec.compressor.coding_context():
                out = tiny_codec.compressor.latent_codec.compress(y, *tiny_codec.compressor._gains(q - 1))
            strings = [s[0] for s in out["strings"]]
            name = tiny_codec.config.model_name.encode()
            body = b"".join([b"\x89OSD", bytes([1, q, len(name)]), name, tiny_codec.model_hash,
                             struct.pack(">IIHHB", w, h, pad_w, pad_h, len(strings)),
                             *(struct.pack(">I", len(s)) for s in strings), *strings])
            old_file = body + struct.pack(">I", zlib.crc32(body))
            assert tiny_codec.compress(photo, quality=q) == old_file
    assert tiny_codec.decompress(old_file).size == (w, h)  # and such a file still decodes


def test_quality_is_checked_in_one_place_and_levels_are_0_based():
    """osdiff.rate.check_quality: the 1-based quality users give, rounded to the 1/256 steps a
    file stores; level_index: the 0-based index the networks take."""
    from osdiff.rate import check_quality, level_index

    assert check_quality(3, 5, continuous=False) == 3 and isinstance(check_quality(3.0, 5, continuous=False), int)
    assert check_quality(2.5, 5, continuous=True) == 2.5 and check_quality(2.5001, 5, continuous=True) == 2.5
    for bad in (0, 5.5, float("nan"), True, "3"):
        with pytest.raises(OSDiffError, match="quality must be a number from 1 to 5"):
            check_quality(bad, 5, continuous=True)
    with pytest.raises(OSDiffError, match="must be an integer from 1 to 4 for this model"):
        check_quality(2.5, 4, continuous=False)
    with pytest.raises(OSDiffError, match="^the file's quality must be an integer from 1 to 4, got 7"):
        check_quality(7, 4, continuous=False, what="the file's quality")
    assert level_index(1) == 0 and level_index(2.5) == 1.5
