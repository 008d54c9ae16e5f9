"""Round trips through the real code paths on tiny random-weight models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import osdiff
from osdiff.entropy.bitstream import parse
from osdiff.models.autoencoder import decode_latent


def _decoded_bytes(codec, data):
    return np.asarray(codec.decompress(data))


@pytest.mark.parametrize("codec_name", ["sd_codec", "tiny_codec"])
def test_roundtrip_size_mode_and_determinism(codec_name, request, photo):
    codec = request.getfixturevalue(codec_name)
    data = codec.compress(photo, quality=2)
    header, strings = parse(data)
    name_len = len(header.model_name.encode())
    header_bytes = 4 + 3 + name_len + 8 + 13
    assert len(data) == header_bytes + 4 * len(strings) + sum(map(len, strings)) + 4
    assert (header.width, header.height) == (56, 40)
    image = codec.decompress(data)
    assert image.size == (56, 40) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), _decoded_bytes(codec, data))
    assert codec.compress(photo, quality=2) == data


def test_sd_path_loads_through_from_pretrained(sd_codec, sd_folder):
    from diffusers import AutoencoderKL, UNetControlNetXSModel

    assert isinstance(sd_codec.vae, AutoencoderKL)
    assert isinstance(sd_codec.unet, UNetControlNetXSModel)
    assert sd_codec.vae.config.scaling_factor == pytest.approx(0.18215)
    # the empty-prompt embedding was computed once from the text encoder and cached
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sd_folder, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(sd_folder, subfolder="text_encoder")
    ids = tok("", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = enc(ids)[0]
    assert torch.allclose(sd_codec.conditioning.embedding, expected, atol=1e-6)


def test_saved_and_reloaded_codec_decodes_identically(sd_codec, sd_codec_folder, photo):
    data = sd_codec.compress(photo, quality=1)
    again = osdiff.load(sd_codec_folder)
    assert again.model_hash == sd_codec.model_hash
    assert np.array_equal(np.asarray(again.decompress(data)), np.asarray(sd_codec.decompress(data)))


@pytest.mark.parametrize("make", [
    lambda a: Image.fromarray(a),
    lambda a: a,
    lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255.0,
    lambda a: torch.from_numpy(a).permute(2, 0, 1)[None],
    lambda a: a.astype(np.float32) / 255.0,
])
def test_accepts_pil_numpy_and_torch(tiny_codec, photo, make):
    reference = tiny_codec.compress(Image.fromarray(photo))
    assert tiny_codec.compress(make(photo)) == reference


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (7, 13), (130, 3), (4000, 1), (1, 4000)])
def test_any_size_round_trips(tiny_codec, size):
    w, h = size
    arr = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = tiny_codec.decompress(tiny_codec.compress(arr))
    assert image.size == (w, h)


def test_quality_levels_change_the_code_and_bad_levels_fail(tiny_codec, photo):
    files = [tiny_codec.compress(photo, quality=q) for q in range(1, tiny_codec.num_quality_levels + 1)]
    assert len(set(files)) == len(files)
    assert [parse(f)[0].quality for f in files] == list(range(1, len(files) + 1))
    top = tiny_codec.num_quality_levels
    for bad in (0, 0.99, top + 1, top + 0.01, float("nan"), float("inf"), "2", True):
        with pytest.raises(osdiff.OSDiffError, match="quality"):
            tiny_codec.compress(photo, quality=bad)


def test_one_step_calls_unet_once_and_ddim_n_times(tiny_codec, photo, monkeypatch):
    data = tiny_codec.compress(photo)
    calls = []
    original = tiny_codec.unet.forward
    monkeypatch.setattr(tiny_codec.unet, "forward", lambda *a, **k: calls.append(k) or original(*a, **k))
    one = tiny_codec.decompress_tensor(data, steps=1).image
    assert len(calls) == 1
    calls.clear()
    many = tiny_codec.decompress_tensor(data, steps=5).image
    assert len(calls) == 5
    assert one.shape == many.shape
    calls.clear()
    hint_only = tiny_codec.decompress_tensor(data, steps=0).image  # the ablation: no UNet
    assert len(calls) == 0 and hint_only.shape == one.shape and not torch.equal(hint_only, one)
    header, strings = tiny_codec.read_header(data)
    with torch.inference_mode(), tiny_codec.coding_context():
        hint = tiny_codec.compressor.decompress(strings, ((header.height + header.pad_h) // 8, (header.width + header.pad_w) // 8),
                                                header.quality - 1)
        direct = ((decode_latent(tiny_codec.vae, hint) + 1) / 2)[:, :, : header.height, : header.width].clamp(0, 1)
    assert torch.allclose(hint_only, direct, atol=1 / 255)


def test_unet_max_quality_skips_the_step_above_it_and_is_hashed(tiny_codec_folder, photo, monkeypatch):
    codec = osdiff.load(tiny_codec_folder)
    plain_hash = codec.model_hash
    files = {q: codec.compress(photo, quality=q) for q in (1, 2)}
    steps_1 = {q: codec.decompress_tensor(d, steps=1).image for q, d in files.items()}
    steps_0 = {q: codec.decompress_tensor(d, steps=0).image for q, d in files.items()}
    assert all(torch.equal(codec.decompress_tensor(d).image, steps_1[q]) for q, d in files.items())  # default: one step

    codec.register_to_config(unet_max_quality=1)
    codec._model_hash = None
    assert codec.model_hash != plain_hash  # files of the two settings decode differently: not interchangeable
    files = {q: codec.compress(photo, quality=q) for q in (1, 2)}
    calls = []
    original = codec.unet.forward
    monkeypatch.setattr(codec.unet, "forward", lambda *a, **k: calls.append(k) or original(*a, **k))
    assert torch.equal(codec.decompress_tensor(files[1]).image, steps_1[1]) and len(calls) == 1
    assert torch.equal(codec.decompress_tensor(files[2]).image, steps_0[2]) and len(calls) == 1  # no UNet above 1
    assert torch.equal(codec.decompress_tensor(files[2], steps=1).image, steps_1[2])  # --steps overrides
    assert [codec.default_steps(q) for q in (1, 1.5, 2)] == [1, 0, 0]


def test_realism_blends_the_step_toward_the_hint_and_is_hashed_only_in_the_config(tiny_codec_folder, photo, monkeypatch):
    codec = osdiff.load(tiny_codec_folder)
    plain_hash = codec.model_hash
    files = {plain_hash: codec.compress(photo, quality=1)}

    def latent(**kw):  # the latent the image decoder is given
        seen, data = [], files[codec.model_hash]
        original = codec.vae.decode
        with monkeypatch.context() as m:
            m.setattr(codec.vae, "decode", lambda z, *a, **k: seen.append(z.float().clone()) or original(z, *a, **k))
            codec.decompress_tensor(data, **kw)
        return seen[0]

    step, hint = latent(steps=1), latent(steps=0)
    assert not torch.allclose(step, hint)
    for r in (0.0, 0.3, 1.0):
        codec.realism_override = r
        assert codec.realism == r
        assert torch.allclose(latent(), hint + r * (step - hint), atol=1e-5)
        assert torch.equal(latent(steps=0), hint)  # no step, nothing to blend
        assert codec.model_hash == plain_hash  # a decoding option: the files stay this model's
    codec.realism_override = None
    assert codec.realism == 1.0
    for bad in (-0.1, 1.5, float("nan")):
        codec.realism_override = bad
        with pytest.raises(ValueError, match="realism"):
            codec.decompress_tensor(files[plain_hash])
    codec.realism_override = None
    codec.register_to_config(realism=0.5)  # a model that ships another default: another model
    codec._model_hash = None
    assert codec.model_hash != plain_hash and codec.realism == 0.5
    files[codec.model_hash] = codec.compress(photo, quality=1)
    assert torch.allclose(latent(), hint + 0.5 * (step - hint), atol=1e-5)
    with pytest.raises(ValueError, match="realism"):
        osdiff.config.DecodingConfig(realism=2)
    assert osdiff.config.DecodingConfig.from_pipeline_config(codec.config).realism == 0.5

    levels = codec.num_quality_levels
    per_level = [0.2] + [0.9] * (levels - 1)  # one value per level: a list, hashed too
    codec.register_to_config(realism=per_level)
    codec._model_hash = None
    assert codec.model_hash not in files and codec.realism == tuple(per_level)
    assert codec.realism_for(1) == 0.2 and codec.realism_for(1.5) == pytest.approx(0.55)
    files[codec.model_hash] = codec.compress(photo, quality=1)
    assert torch.allclose(latent(), hint + 0.2 * (step - hint), atol=1e-5)
    assert osdiff.config.DecodingConfig.from_pipeline_config(codec.config).realism == tuple(per_level)
    codec.register_to_config(realism=[0.2] * (levels + 1))
    codec._model_hash = None
    files[codec.model_hash] = codec.compress(photo, quality=1)
    with pytest.raises(osdiff.OSDiffError, match="realism has"):
        codec.decompress_tensor(files[codec.model_hash])


def test_ddim_timesteps():
    from osdiff.denoise import ddim_timesteps

    assert ddim_timesteps(499, 1) == [499]
    ts = ddim_timesteps(499, 5)
    assert ts[0] == 499 and len(ts) == 5 and ts == sorted(ts, reverse=True) and ts[-1] > 0


def test_x0_recovery_inverts_forward_diffusion():
    from osdiff.denoise import add_noise, predict_x0_eps

    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    a = 0.3
    xt = add_noise(x0, eps, a)
    rx0, reps = predict_x0_eps(eps, xt, a, "epsilon")
    assert torch.allclose(rx0, x0, atol=1e-5) and torch.allclose(reps, eps)
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0
    rx0, reps = predict_x0_eps(v, xt, a, "v_prediction")
    assert torch.allclose(rx0, x0, atol=1e-5) and torch.allclose(reps, eps, atol=1e-5)


def test_file_from_another_model_is_refused(tiny_codec, sd_codec, photo):
    data = sd_codec.compress(photo)
    with pytest.raises(osdiff.OSDiffError, match="made by model"):
        tiny_codec.decompress(data)


def test_shipped_default_model_round_trips(photo):
    codec = osdiff.load("osdiff-tiny")
    assert "osdiff-tiny" in osdiff.available_models()
    data = codec.compress(photo)
    assert parse(data)[0].model_name == "osdiff-tiny"
    assert codec.decompress(data).size == (56, 40)


def test_unknown_model_name_is_one_clear_error():
    with pytest.raises(osdiff.OSDiffError, match="no model"):
        osdiff.load("no-such-model")


def test_sd_folder_missing_parts_is_refused(tmp_path):
    from osdiff.build import from_stable_diffusion

    with pytest.raises(osdiff.OSDiffError, match="missing"):
        from_stable_diffusion(tmp_path)
