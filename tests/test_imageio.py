"""Image input: every mode becomes RGB; EXIF orientation; bad files fail cleanly."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from osdiff import OSDiffError, OSDiffWarning
from osdiff.imageio import open_image, to_tensor


def _save(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGB", "CMYK", "I;16", "I", "F"])
def test_modes_become_rgb(tmp_path, mode):
    img = Image.new(mode, (9, 7))
    fmt = {"CMYK": "img.tif", "I": "img.tif", "F": "img.tif"}.get(mode, "img.png")
    loaded = open_image(_save(tmp_path, img, fmt))
    assert loaded.mode == "RGB" and loaded.size == (9, 7)


def test_16_bit_is_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 65535 // 2, dtype=np.uint16)
    loaded = open_image(_save(tmp_path, Image.fromarray(arr), "g16.png"))
    assert abs(int(np.asarray(loaded)[0, 0, 0]) - 128) <= 1


def test_rgba_drops_alpha_with_warning(tmp_path):
    img = Image.new("RGBA", (5, 5), (10, 20, 30, 100))
    with pytest.warns(OSDiffWarning, match="alpha"):
        loaded = open_image(_save(tmp_path, img, "a.png"))
    assert loaded.getpixel((0, 0)) == (10, 20, 30)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(tmp_path, img, "rot.jpg", exif=exif)
    assert open_image(path).size == (10, 20)


def test_animated_gif_first_frame_with_warning(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.warns(OSDiffWarning, match="first frame"):
        assert open_image(path).size == (6, 6)


def test_truncated_png_and_non_image(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(OSDiffError, match="not a readable image"):
        open_image(truncated)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(OSDiffError, match="not a readable image"):
        open_image(text)
    with pytest.raises(OSDiffError, match="no such file"):
        open_image(tmp_path / "missing.png")


@pytest.mark.parametrize("bad", [
    np.zeros((0, 5, 3), np.uint8),
    np.zeros((4, 4, 2), np.uint8),
    np.zeros((4, 4), np.int64),
    np.full((4, 4, 3), np.nan, np.float32),
    torch.zeros(2, 3, 4, 4),
    torch.zeros(5, 4, 4),
    "not/a/file.png",
    12,
])
def test_bad_arrays_fail_cleanly(bad):
    with pytest.raises(OSDiffError):
        to_tensor(bad)


def test_tensor_layout_and_range():
    arr = np.random.default_rng(1).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    t = to_tensor(arr)
    assert t.shape == (1, 3, 3, 5) and t.dtype == torch.float32
    assert torch.allclose(t[0, :, 1, 2] * 255, torch.tensor(arr[1, 2], dtype=torch.float32))
    assert torch.equal(to_tensor(arr[:, :, 0]), to_tensor(np.repeat(arr[:, :, :1], 3, axis=2)))
