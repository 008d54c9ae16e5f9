"""The port of the official OSDiff code, checked without the official code.

tests/fixtures/official_tiny holds what scripts/check_official.py wrote from the official
modules at tiny widths: checkpoints in the official layout (sd.ckpt, lambda.ckpt), their
official-format config, the official outputs (strings, y_hat, hint, epsilon, x0, pixels, the
empty-prompt embedding) and the full-size official key layout. These tests convert the
checkpoints with `osdiff convert-official` and compare with the same tolerances.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "fixtures" / "official_tiny"


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(capsys, *args: str) -> _Result:
    """`osdiff ARGS` in this process (a subprocess per call costs seconds of imports)."""
    from osdiff.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return _Result(rc, out.out, out.err)


@pytest.fixture(scope="module")
def official_outputs() -> dict:
    from safetensors.torch import load_file

    return load_file(str(FIXTURE / "official_outputs.safetensors"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    from osdiff.cli import main

    out = tmp_path_factory.mktemp("official") / "model"
    rc = main(["convert-official", "--sd", str(FIXTURE / "sd.ckpt"), "--ckpt", str(FIXTURE / "lambda.ckpt"),
               "--config", str(FIXTURE / "osdiff_tiny.yaml"), "-o", str(out), "--name", "official-tiny"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def official_pipe(converted):
    import osdiff

    return osdiff.load(converted)


def test_converted_model_matches_official_outputs(official_pipe, official_outputs):
    from osdiff.convert.verify import TOL, compare, failures

    diffs = compare(official_pipe, official_outputs)
    assert not failures(diffs), {k: (diffs[k], TOL.get(k)) for k in failures(diffs)}
    assert diffs["strings_equal"] == 1.0  # float mode writes the official bytes


def test_official_stream_file_decodes(official_pipe, official_outputs):
    """A file as the official `write_body` lays it out decodes to the official pixels."""
    y, z = bytes(official_outputs["y_string"].numpy()), bytes(official_outputs["z_string"].numpy())
    zh, zw = (int(v) for v in official_outputs["z_shape"])
    import struct

    stream = struct.pack(">3I", zh, zw, 2) + struct.pack(">I", len(y)) + y + struct.pack(">I", len(z)) + z
    image = official_pipe.decode_official_stream(stream, 1, x_t=official_outputs["x_t"])  # the official draw
    pixels = torch.round(image * 255).to(torch.int16)
    assert (pixels - official_outputs["pixels"].to(torch.int16)).abs().max() <= 1
    default = official_pipe.decode_official_stream(stream, 1)  # osdiff's fixed-seed noise
    assert default.shape == image.shape and not torch.equal(default, image)
    from osdiff.errors import OSDiffError

    with pytest.raises(OSDiffError, match="not an official OSDiff stream"):
        official_pipe.decode_official_stream(stream[:-3], 1)


def test_fullsize_key_map_covers_the_official_layout():
    """Every full-size official control/compressor key maps onto our full-size modules with its
    shape, and every one of our parameters is covered; the SD UNet/VAE keys go through
    diffusers' ldm converters onto the configs built from the official numbers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm,
    )

    from osdiff.convert.official import OFFICIAL_SD21_CONFIG, OfficialModelConfig, map_control_key, map_lfgcm_key
    from osdiff.models.official import CDDMControl, OfficialLFGCM

    layout = json.loads((FIXTURE / "fullsize_layout.json").read_text())
    assert len([k for k in layout if k.startswith("control_model.") and "zero_convs_out" in k]) == 2 * (12 + 12)
    cfg = OfficialModelConfig.from_dict(OFFICIAL_SD21_CONFIG)
    with torch.device("meta"):
        control = CDDMControl(**cfg.control_kwargs())
        unet_cfg = create_unet_diffusers_config_from_ldm(cfg.ldm_config(), {})
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(cfg.ldm_config(), {}))
    lfgcm = OfficialLFGCM(**cfg.lfgcm_kwargs())
    for module, mapper, prefix in ((control, map_control_key, "control_model."), (lfgcm, map_lfgcm_key, "preprocess_model.")):
        ours = {k: list(v.shape) for k, v in module.state_dict().items()}
        mapped = {}
        for key, shape in layout.items():
            if key.startswith(prefix) and (new := mapper(key)) is not None and new in ours:
                mapped[new] = shape
        assert set(mapped) == set(ours), sorted(set(ours) ^ set(mapped))[:5]
        assert all(mapped[k] == ours[k] for k in ours), [k for k in ours if mapped[k] != ours[k]][:5]
        unused = {k for k in layout if k.startswith(prefix) and (mapper(k) is None or mapper(k) not in ours)}
        assert all(re.search(r"(sft|h_a[1478]\.|f_c\.|_quantized_cdf|_offset|_cdf_length|scale_table)", k) for k in unused), sorted(unused)[:5]
    from osdiff.convert.official import official_control_keys

    assert set(official_control_keys(control).values()) == {k for k in layout if k.startswith("control_model.")}
    sd = {k: torch.empty(v, device="meta") for k, v in layout.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    for module, converted in ((unet, convert_ldm_unet_checkpoint(sd, unet.config)), (vae, convert_ldm_vae_checkpoint(sd, vae.config))):
        ours = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert set(converted) == set(ours)
        assert all(list(converted[k].shape) == ours[k] for k in ours)


def test_converted_model_round_trips_through_the_cli(capsys, converted, tmp_path, photo):
    from PIL import Image

    Image.fromarray(photo).save(tmp_path / "a.png")
    r = _cli(capsys, "compress", str(tmp_path / "a.png"), "-m", str(converted), "-o", str(tmp_path / "a.osd"))
    assert r.returncode == 0, r.stderr
    r = _cli(capsys, "info", "--json", str(tmp_path / "a.osd"))
    info = json.loads(r.stdout)
    assert (info["model_name"], info["width"], info["height"], info["pad_w"], info["pad_h"]) == ("official-tiny", 56, 40, 8, 24)
    assert info["string_bytes"][0] == 1  # the coding-mode byte
    r = _cli(capsys, "decompress", str(tmp_path / "a.osd"), "-m", str(converted), "-o", str(tmp_path / "b.png"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "b.png").size == (56, 40)
    r = _cli(capsys, "decompress", str(tmp_path / "a.osd"), "-m", str(converted), "--steps", "4", "-o", str(tmp_path / "c.png"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "one step" in r.stderr


def test_exact_and_float_files_decode_deterministically(official_pipe, photo):
    """Both coding modes decode to the same image on repeat; the file names its mode."""
    from osdiff.entropy.bitstream import parse

    pipe = official_pipe
    out = {}
    for mode in ("exact", "float"):
        pipe.coding_mode = mode
        data = pipe.compress(photo)
        assert parse(data)[1][0] == {"exact": b"\x00", "float": b"\x01"}[mode]
        out[mode] = (data, pipe.decompress_tensor(data).image)
        assert torch.equal(out[mode][1], pipe.decompress_tensor(data).image)
        assert data == pipe.compress(photo)
    pipe.coding_mode = "exact"
    img = out["exact"][1]
    assert img.shape == (1, 3, 40, 56)
    assert torch.equal(torch.floor(img * 255 + 1e-4), torch.round(img * 255))  # multiples of 1/255 (floor rounding)


def test_caller_supplied_x_t_changes_only_the_noise(official_pipe, photo):
    pipe = official_pipe
    x_t = torch.randn(1, 4, 64 // 8, 64 // 8, generator=torch.Generator().manual_seed(3))
    a, data = pipe.reconstruct(photo, x_t=x_t)
    b, _ = pipe.reconstruct(photo, x_t=x_t)
    default = pipe.decompress_tensor(data).image
    assert torch.equal(a, b) and a.shape == default.shape
    assert not torch.equal(a, default)


def test_eval_and_serve_accept_a_converted_model(converted, tmp_path, photo, capsys):
    from PIL import Image

    data_dir = tmp_path / "images"
    data_dir.mkdir()
    Image.fromarray(photo).save(data_dir / "p.png")
    r = _cli(capsys, "eval", str(data_dir), "--codecs", f"official-tiny={converted},jpeg", "--out", str(tmp_path / "ev"), "--no-crops")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "official-tiny" in (tmp_path / "ev" / "report.html").read_text()

    from fastapi.testclient import TestClient

    import osdiff
    from osdiff.config import ServeLimits
    from osdiff.serve import create_app

    client = TestClient(create_app(osdiff.load(converted), ServeLimits(compare_codecs=("jpeg",))))
    import io

    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    r = client.post("/api/compress?quality=1", content=buf.getvalue())
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body["width"] == 56 and body["height"] == 40
    r = client.post("/api/decompress", content=__import__("base64").b64decode(body["file"]))
    assert r.status_code == 200, r.text[:500]


def test_levels_are_ordered_by_rate(tmp_path):
    """Two λ checkpoints become quality levels 1 (fewer bits) and 2, whatever the order given."""
    from osdiff.cli import main
    from osdiff.convert.official import read_state_dict

    state = read_state_dict(FIXTURE / "lambda.ckpt", "test")
    bigger = dict(state)
    bigger["preprocess_model.encoder.g_a6.weight"] = state["preprocess_model.encoder.g_a6.weight"] * 8
    torch.save({"state_dict": bigger}, tmp_path / "lambda_big.ckpt")
    out = tmp_path / "model"
    rc = main(["convert-official", "--sd", str(FIXTURE / "sd.ckpt"), "--ckpt", str(tmp_path / "lambda_big.ckpt"),
               "--ckpt", str(FIXTURE / "lambda.ckpt"), "--config", str(FIXTURE / "osdiff_tiny.yaml"), "-o", str(out)])
    assert rc == 0
    import osdiff

    pipe = osdiff.load(out)
    assert pipe.num_quality_levels == 2
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sizes = [len(pipe.compress(image, q)) for q in (1, 2)]
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize("case", ["missing", "wrong", "sd15", "truncated", "pickle", "swapped"])
def test_converter_bad_inputs_get_one_line(case, tmp_path, capsys):
    sd, lam = FIXTURE / "sd.ckpt", FIXTURE / "lambda.ckpt"
    if case == "missing":
        lam = tmp_path / "nope.ckpt"
    elif case == "wrong":
        torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, tmp_path / "w.ckpt")
        lam = tmp_path / "w.ckpt"
    elif case == "sd15":
        torch.save({"state_dict": {"model.diffusion_model.out.0.weight": torch.zeros(2),
                                   "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2, 2)}},
                   tmp_path / "sd15.ckpt")
        sd = tmp_path / "sd15.ckpt"
    elif case == "truncated":
        (tmp_path / "t.ckpt").write_bytes(lam.read_bytes()[: 100_000])
        lam = tmp_path / "t.ckpt"
    elif case == "pickle":
        import argparse

        torch.save({"state_dict": {"a": torch.zeros(1)}, "x": argparse.Namespace(a=1)}, tmp_path / "p.ckpt")
        lam = tmp_path / "p.ckpt"
    elif case == "swapped":
        sd, lam = lam, sd
    out = tmp_path / "out"
    r = _cli(capsys, "convert-official", "--sd", str(sd), "--ckpt", str(lam), "--config", str(FIXTURE / "osdiff_tiny.yaml"), "-o", str(out))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("osdiff: error: "), r.stderr
    expected = {"missing": "no such file", "wrong": "not an OSDiff lambda checkpoint", "sd15": "Stable Diffusion 1.x",
                "truncated": "truncated or corrupt", "pickle": "refused to load", "swapped": "not an OSDiff lambda checkpoint"}[case]
    assert expected in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_exact_gelu_table_has_no_rounding_ties():
    """The exact GELU table is the same under any libm: no entry within 1e-9 of a tie."""
    from osdiff.entropy.exact import ACT_FRAC, GELU_RANGE, exact_gelu

    x = torch.arange(-GELU_RANGE * 2**ACT_FRAC, GELU_RANGE * 2**ACT_FRAC + 1, dtype=torch.float64) / 2**ACT_FRAC
    scaled = 0.5 * x * (1 + torch.erf(x / 2**0.5)) * 2**ACT_FRAC
    assert ((scaled - scaled.floor() - 0.5).abs() > 1e-9).all()
    big = torch.tensor([-20.0, -8.5, 8.5, 20.0], dtype=torch.float64)
    assert exact_gelu(big).tolist() == [0.0, 0.0, 8.5, 20.0]
    assert (exact_gelu(x) - torch.nn.functional.gelu(x)).abs().max() <= 2**-ACT_FRAC


def test_bench_times_a_converted_model(official_pipe):
    """`osdiff bench` on a converted official model: components, both entropy-coding modes."""
    from osdiff.benchmark import benchmark, format_table
    from osdiff.errors import OSDiffError

    result = benchmark(official_pipe, (64, 64), [1], repeat=1, warmup=0, model_label="official-tiny")
    for key in ("compress_exact", "compress_float", "analysis", "autoencoder_encode"):
        assert result.encode[key].median_s > 0
    for key in ("entropy_decode_exact", "entropy_decode_float", "synthesis", "unet_step", "autoencoder_decode"):
        assert result.decode[key].median_s > 0
    assert "decode.entropy_decode_exact" in format_table(result)
    with pytest.raises(OSDiffError, match="one step"):
        benchmark(official_pipe, (64, 64), [1, 4], repeat=1, warmup=0)


def test_official_training_on_the_tiny_sd(sd_folder, tmp_path):
    """Stage 'official' trains the ported LFGCM + CDDM on a frozen SD (tiny), resumes, and
    writes a converted-model folder that codes images."""
    import copy
    import shutil

    import yaml

    import osdiff
    from osdiff.training.config import load_config
    from osdiff.training.official import control_kwargs_for, init_control_from_unet
    from osdiff.training.trainer import Trainer

    from PIL import Image

    image_folder = tmp_path / "images"
    image_folder.mkdir()
    for i in range(2):
        pixels = torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(i))
        Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(image_folder / f"{i}.png")
    base = tmp_path / "sd"
    shutil.copytree(sd_folder, base)
    sched = base / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace("v_prediction", "epsilon"))
    config = {
        "model": "official", "base_model": str(base), "official_config": str(FIXTURE / "osdiff_tiny.yaml"),
        "model_name": "official-trained", "output_dir": str(tmp_path / "run"), "val_every": 2,
        "data": {"train_folders": [str(image_folder)], "val_folders": [str(image_folder)], "max_val_images": 1},
        "stages": [{"name": "official", "steps": 2, "batch_size": 1, "crop": 128, "rate_lambdas": [1.0], "warmup_steps": 1}],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(tmp_path / "c.yaml")
    assert Trainer(cfg).run(max_steps=1) is None  # stopped after a checkpoint
    model = Trainer(cfg).run()
    assert model is not None
    log = (tmp_path / "run" / "log-0-official.csv").read_text().splitlines()
    assert len(log) == 3 and "hint_mse" in log[0]
    from osdiff.convert.official import convert_level, read_state_dict

    exported = read_state_dict(tmp_path / "run" / "official_lambda.ckpt", "test")
    pipe = osdiff.load(model)
    lfgcm, ctl = copy.deepcopy(pipe.levels.compressors[0]), copy.deepcopy(pipe.levels.controls[0])
    for m in (lfgcm, ctl):
        for p in m.parameters():
            p.data.zero_()
    assert convert_level(exported, ctl, lfgcm, Path("x")) == []  # the official layout maps back, nothing left over
    assert all(torch.equal(a, b) for a, b in zip(ctl.state_dict().values(), pipe.levels.controls[0].state_dict().values()))
    data = pipe.compress(torch.rand(1, 3, 128, 120, generator=torch.Generator().manual_seed(0)))  # this UNet's deepest level needs 128 px
    assert pipe.decompress_tensor(data).image.shape == (1, 3, 128, 120)

    from diffusers import UNet2DConditionModel

    from osdiff.models.official import CDDMControl

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    control = CDDMControl(**control_kwargs_for(unet, {"control_model_ratio": 0.5}))
    init_control_from_unet(control, unet)
    assert torch.equal(control.time_embedding.linear_1.weight, unet.time_embedding.linear_1.weight)
    w = unet.conv_in.weight
    assert torch.equal(control.input_blocks[0][0].weight, torch.cat([w, w], 1)[: control.input_blocks[0][0].out_channels])


def test_sd21_config_trains_the_official_model():
    from osdiff.training.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sd21.yaml")
    assert cfg.model == "official" and [s.name for s in cfg.stages] == ["official"]
    stage = cfg.stages[0]
    assert (stage.lr, stage.lr_aux, stage.lr_discriminator, stage.rate_lambdas) == (1e-4, 1e-3, 1e-4, [1.0])


def test_tampered_official_files_fail_cleanly(official_pipe, photo):
    """Corrupted payloads (CRC recomputed) decode to an image or raise OSDiffError, nothing else."""
    import random
    import struct
    import zlib

    from osdiff.errors import OSDiffError

    data = official_pipe.compress(photo)
    rng = random.Random(0)
    outcomes = set()
    for trial in range(8):
        body = bytearray(data[:-4])
        if trial == 0:
            body[-(len(body) // 3)] = 7  # inside the strings
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(30, len(body))
            body[i] ^= 1 << rng.randrange(8)
        try:
            official_pipe.decompress_tensor(bytes(body) + struct.pack(">I", zlib.crc32(bytes(body))))
            outcomes.add("image")
        except OSDiffError:
            outcomes.add("error")
    assert outcomes
