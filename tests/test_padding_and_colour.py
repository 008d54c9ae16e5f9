"""Coding only as much padding as the networks need, and the mean colour as side information."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from compressai.latent_codecs import GainHyperLatentCodec

import osdiff
from osdiff.entropy.bitstream import pack, parse
from osdiff.errors import OSDiffError
from osdiff.mean_colour import match_mean_colour, mean_colour_bytes
from osdiff.models.compressor import LatentCompressor


@pytest.fixture(scope="module")
def compressor() -> LatentCompressor:
    """v2's layout (one analysis downsampling, two in the hyperprior) at small widths."""
    torch.manual_seed(0)
    model = LatentCompressor(latent_channels=4, hidden_channels=16, code_channels=16, groups=(4, 4, 8),
                             analysis_downsamples=1, hyper_downsamples=2, num_quality_levels=2).eval()
    model.update(force=True)
    return model


def test_latent_that_is_not_a_multiple_of_the_hyperprior_round_trips(compressor):
    latent = torch.randn(1, 4, 12, 20)  # y is 6x10: not a multiple of the hyperprior's 4
    assert compressor.code_shapes((12, 20))["hyper"] == (2, 3, 6, 10)
    out = compressor.compress(latent, 1)
    assert len(out["strings"]) == compressor.num_strings()
    hint = compressor.decompress(out["strings"], (12, 20), 1)
    assert hint.shape == latent.shape
    torch.testing.assert_close(hint, out["hint"], rtol=0, atol=0)
    rate = compressor(latent, 0)["likelihoods"]
    assert rate["y"].shape[-2:] == (6, 10) and rate["z"].shape[-2:] == (2, 3)


def test_whole_multiples_code_exactly_as_compressai_does(compressor):
    """Padding and cropping are no-ops when y is a multiple: the same parameters as compressai's
    GainHyperLatentCodec, so files of earlier models decode unchanged."""
    hyper = compressor.latent_codec["hyper"]
    y = compressor.g_a(torch.randn(1, 4, 16, 24))
    gain, gain_inv = torch.ones(1, 16, 1, 1) * 0.7, torch.ones(1, 16, 1, 1) / 0.7
    ours, theirs = hyper.compress(y, gain, gain_inv), GainHyperLatentCodec.compress(hyper, y, gain, gain_inv)
    assert ours["strings"] == theirs["strings"]
    torch.testing.assert_close(ours["params"], theirs["params"], rtol=0, atol=0)


def test_encoding_takes_y_hat_from_its_symbols_as_decoding_its_strings_would(compressor, monkeypatch):
    """SymbolGaussianConditionalLatentCodec skips compressai's decode of its own strings: the
    strings and the hint are the same as with compressai's codec, also for values far outside the
    entropy tables (coded by the escape path)."""
    from compressai.latent_codecs import GaussianConditionalLatentCodec

    from osdiff.models.compressor import SymbolGaussianConditionalLatentCodec

    torch.manual_seed(1)
    latent = torch.cat([torch.randn(1, 4, 16, 24) * 3, torch.randn(1, 4, 16, 24) * 300], dim=-1)
    with torch.no_grad():
        ours = [compressor.compress(latent, q) for q in (0, 1)]
        monkeypatch.setattr(SymbolGaussianConditionalLatentCodec, "compress", GaussianConditionalLatentCodec.compress)
        theirs = [compressor.compress(latent, q) for q in (0, 1)]
    for a, b in zip(ours, theirs):
        assert a["strings"] == b["strings"]
        torch.testing.assert_close(a["hint"], b["hint"], rtol=0, atol=0)
    assert ours[1]["strings"] != ours[0]["strings"]


def test_latent_the_checkerboard_cannot_take_is_refused(compressor):
    assert compressor.min_latent_multiple == 4
    with pytest.raises(ValueError, match="multiples of 4"):
        compressor.compress(torch.randn(1, 4, 10, 12), 0)
    with pytest.raises(ValueError, match="multiples of 4"):
        compressor.code_shapes((12, 10))


@pytest.fixture(scope="module")
def v2_layout_folder(tmp_path_factory) -> Path:
    from osdiff.build import build_tiny, save_for_shipping
    from osdiff.config import CompressorArchitecture, TinyArchitecture

    arch = TinyArchitecture(
        unet_block_out_channels=(32, 32), cross_attention_dim=32, unet_attention_head_dim=16,
        compressor=CompressorArchitecture(hidden_channels=32, code_channels=32, groups=(8, 8, 16),
                                          analysis_downsamples=1, hyper_downsamples=2),
    )
    out = tmp_path_factory.mktemp("v2-layout")
    save_for_shipping(build_tiny(arch, name="tiny-test"), out)
    return out


def _with_config(folder: Path, tmp_path: Path, **settings) -> Path:
    """A copy of a model folder with `settings` written into (or, for None, removed from) its
    model_index.json."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    for key, value in settings.items():
        index.pop(key, None) if value is None else index.__setitem__(key, value)
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


def _image(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 3 % 256, y * 5 % 256, np.full_like(x, 200)], axis=-1)
    img[height // 4 : height // 2, width // 3 : width // 2] = [20, 200, 40]
    return img.astype(np.uint8)


def test_default_settings_keep_the_model_hash(v2_layout_folder, tmp_path):
    """Models saved before pad_multiple/mean_colour existed keep their hash; setting them changes it."""
    saved = osdiff.load(v2_layout_folder)
    assert saved.config.pad_multiple is None and saved.config.mean_colour is False
    older = osdiff.load(_with_config(v2_layout_folder, tmp_path / "a", pad_multiple=None, mean_colour=None))
    assert older.model_hash == saved.model_hash and older.pad_multiple == 64
    changed = osdiff.load(_with_config(v2_layout_folder, tmp_path / "b", pad_multiple=32))
    assert changed.model_hash != saved.model_hash


def test_pad_multiple_codes_fewer_padded_pixels(v2_layout_folder, tmp_path):
    codec = osdiff.load(_with_config(v2_layout_folder, tmp_path, pad_multiple=32))
    image = _image(70, 100)
    data = codec.compress(image, quality=1)
    header, _ = parse(data)
    assert (header.width + header.pad_w, header.height + header.pad_h) == (128, 96)  # 64-px padding: 128x128
    assert codec.decompress(data).size == (100, 70)


def test_pad_multiple_the_networks_cannot_take_is_one_clear_error(v2_layout_folder, tmp_path):
    codec = osdiff.load(_with_config(v2_layout_folder, tmp_path, pad_multiple=24))
    with pytest.raises(OSDiffError, match="pad_multiple 24 is not a multiple of 32"):
        codec.compress(_image(40, 40), quality=1)


@pytest.fixture
def colour_codec(v2_layout_folder, tmp_path):
    return osdiff.load(_with_config(v2_layout_folder, tmp_path, pad_multiple=32, mean_colour=True))


def test_mean_colour_is_stored_and_matched(colour_codec):
    image = _image(70, 100)
    data = colour_codec.compress(image, quality=1)
    header, strings = parse(data)
    assert len(strings) == colour_codec.num_strings() + 1 == colour_codec.file_strings()
    assert strings[-1] == bytes(int(round(v)) for v in image.reshape(-1, 3).mean(0))
    assert len(data) >= colour_codec.min_file_bytes()
    decoded = np.asarray(colour_codec.decompress(data), dtype=np.float64)
    assert np.abs(decoded.reshape(-1, 3).mean(0) - image.reshape(-1, 3).mean(0)).max() <= 1.0
    # without the shift, this untrained model's colours are far off: the side information did it
    raw = colour_codec.decode_strings(strings[:-1], header, 1)[:, :, :70, :100]
    assert (raw.mean(dim=(0, 2, 3)) * 255 - torch.tensor(image.reshape(-1, 3).mean(0))).abs().max() > 3


def test_wrong_mean_colour_string_is_one_clear_error(colour_codec):
    header, strings = parse(colour_codec.compress(_image(40, 40), quality=1))
    with pytest.raises(OSDiffError, match="mean colour is 2 bytes"):
        colour_codec.decompress(pack(header, strings[:-1] + [b"\x10\x20"]))


def test_match_mean_colour_reaches_the_target_despite_clipping():
    image = torch.zeros(1, 3, 8, 8)
    image[..., :4, :] = 1.0  # half white, half black: mean 127.5 levels, shifting up clips
    target = bytes([200, 100, 128])
    out = match_mean_colour(image, target)
    assert mean_colour_bytes(image) == bytes([128, 128, 128])
    assert (out.mean(dim=(0, 2, 3)) * 255 - torch.tensor([200.0, 100.0, 128.0])).abs().max() < 1.0
    assert out.min() >= 0 and out.max() <= 1
