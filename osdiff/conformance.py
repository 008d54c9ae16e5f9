"""Conformance vectors: shipped `.osd` files with what every decoder must get from them.

A vector is `<model>/format-<v>/<name>.osd` under `osdiff/conformance_vectors/` (package data,
so an installed wheel can check itself) with `<name>.json` beside it:

  symbols_sha256  SHA-256 of the entropy-decoded symbols: the integers every compressai entropy
                  model of the codec decodes (quantised y and z, before dequantisation), int64
                  little-endian, in decoding order. They must be identical on every machine and
                  device: the entropy parameters are computed in exact fixed point.
  pixels_sha256   SHA-256 of the decoded image's raw pixels (H,W,3 uint8), valid where the
                  kernels in `recorded_on` run (`environment`: ATen capability, oneDNN ISA, BLAS
                  and vendor, torch build, mode): there they must match.
  psnr_db         PSNR of the decoded image against its generated source (`source_image`);
                  elsewhere (other kernels, --fast, a GPU) it must stay within PSNR_TOLERANCE_DB.

`check` decodes a vector with the symbols recorded and says which of the three held; the
images come from `source_image`, integer arithmetic only, so no photo is needed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from compressai.entropy_models import EntropyModel
from torch import Tensor, nn

from . import kernels
from .entropy.bitstream import parse
from .errors import OSDiffError
from .quality.pixel import psnr_uint8

VECTOR_ROOT = Path(__file__).resolve().parent / "conformance_vectors"
# Measured here (AMD EPYC, torch 2.14.1): --fast against the deterministic mode with oneDNN off
# changed at most 86 of 3.4 M decoded values, by one level, and every vector's PSNR by at most
# 0.00001 dB; with oneDNN on in both (now) nothing differs on 2 cores (docs/bitstream.md). The
# tolerance leaves room for other CPUs and GPUs, whose float rounding differs more, and for the
# UNet step's amplification of it (x1.8 for a start at t = 299, as osdiff-tiny's up to v2.2; a model
# decoding from pure noise at t = 999 amplifies by x14.6).
PSNR_TOLERANCE_DB = 0.05


def source_image(width: int, height: int) -> np.ndarray:
    """The generated test image (height, width, 3) uint8: gradients, a disc, stripes and
    hashed texture, from integer arithmetic only (the same on every platform and numpy)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    texture = ((x * 73856093) ^ (y * 19349663)) % 29 - 14
    r = (x * 255) // max(1, width - 1)
    g = (y * 255) // max(1, height - 1)
    b = ((x + 2 * y) * 3) % 256
    disc = (x - width // 3) ** 2 + (y - height // 2) ** 2 < (min(width, height) // 4) ** 2
    stripes = ((x // 4) % 2 == 0) & (x > 2 * width // 3)
    img = np.stack([r, g, b], axis=-1) + texture[..., None]
    img[disc] = (img[disc] + np.array([180, 40, 60])) // 2
    img[stripes] = 255 - img[stripes]
    return np.clip(img, 0, 255).astype(np.uint8)


@contextlib.contextmanager
def record_symbols(module: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the integer symbols each compressai entropy model inside `module` decodes, in
    order, while the context is open (the hook on `dequantize`, which every entropy model's
    `decompress` calls with the decoded integers)."""
    recorded: list[Tensor] = []
    models = [m for m in module.modules() if isinstance(m, EntropyModel)]

    def hook(original):
        def dequantize(inputs, means=None, dtype=torch.float):
            recorded.append(inputs.detach().to(torch.int64).cpu().clone())
            return original(inputs, means, dtype)

        return dequantize

    for m in models:
        m.dequantize = hook(m.dequantize)
    try:
        yield recorded
    finally:
        for m in models:
            del m.dequantize


def symbols_digest(symbols: list[Tensor]) -> tuple[str, int]:
    """(SHA-256 hex, count) of recorded symbols, shapes included."""
    digest, count = hashlib.sha256(), 0
    for t in symbols:
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.contiguous().numpy().astype("<i8").tobytes())
        count += t.numel()
    return digest.hexdigest(), count


def pixels_digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """osdiff's PSNR (`quality.pixel.psnr_uint8`), 99 dB for identical images (JSON has no inf)."""
    value = psnr_uint8(a, b)
    return 99.0 if math.isinf(value) else value


def cpu_name() -> str:
    """The CPU model as the kernel names it (Linux), else platform.processor()."""
    from .kernels import cpuinfo

    return cpuinfo("model name") or platform.processor() or platform.machine()


def environment(pipe, device: torch.device) -> dict:
    """Everything that selects the kernels pixels are decoded with: on the CPU, ATen's capability,
    oneDNN's ISA cap and the BLAS with the vendor it dispatches on (osdiff.kernels); on a GPU its
    name and CUDA; the torch version and build, and the compute mode. `processor` names the CPU
    model (for people: not compared)."""
    env = {"device": device.type}
    if device.type == "cuda":
        env |= {"processor": torch.cuda.get_device_name(device), "cuda": str(torch.version.cuda)}
    else:
        env |= {"processor": cpu_name(), **kernels.in_force()}
    return env | {"torch": torch.__version__, "torch_build": (torch.version.git_version or "")[:12],
                  "mode": "deterministic" if pipe.compute.deterministic else "fast"}


def kernel_differences(here: dict, recorded: dict) -> list[str]:
    """'here vs recorded' for each compared entry that differs (all but a CPU's model name)."""
    skip = {"processor"} if here.get("device") == "cpu" and recorded.get("device") == "cpu" else set()
    keys = [k for k in dict.fromkeys([*recorded, *here]) if k not in skip]
    return [f"{k} {here.get(k, '-')} vs {recorded.get(k, '-')}" for k in keys if here.get(k) != recorded.get(k)]


def decode_recording(pipe, data: bytes) -> tuple[np.ndarray, list[Tensor]]:
    """Decode `.osd` bytes -> (pixels (H,W,3) uint8, entropy-decoded symbols), in float32 (the
    reference arithmetic, whatever `pipe.compute.precision` says: vectors are recorded and checked in it)."""
    saved = pipe.compute
    pipe.compute = replace(saved, precision="float32")
    try:
        with record_symbols(getattr(pipe, pipe.entropy_coder)) as symbols:
            image = pipe.decompress(data)
    finally:
        pipe.compute = saved
    return np.asarray(image), list(symbols)


@dataclass
class VectorResult:
    name: str
    symbols: str  # "ok" | "MISMATCH" | "decode error: ..."
    pixels: str  # "ok" | "MISMATCH" | "other kernels (...), within 0.05 dB" (judged by the PSNR)
    psnr: str  # "ok (x dB)" | "OUT OF TOLERANCE (...)"

    @property
    def passed(self) -> bool:
        return self.symbols == "ok" and self.pixels != "MISMATCH" and self.psnr.startswith("ok")

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: symbols {self.symbols}; pixels {self.pixels}; psnr {self.psnr}"


def check_vector(pipe, osd_path: Path, data: bytes | None = None) -> VectorResult:
    """Decode one vector (or `data` in its place) and compare it with its JSON record."""
    record = json.loads(osd_path.with_suffix(".json").read_text())
    name = f"{record['model']}/{osd_path.stem}"
    data = osd_path.read_bytes() if data is None else data
    try:
        pixels, symbols = decode_recording(pipe, data)
    except OSDiffError as exc:
        return VectorResult(name, f"decode error: {exc}", "-", "-")
    sha, count = symbols_digest(symbols)
    sym = "ok" if (sha, count) == (record["symbols_sha256"], record["symbol_count"]) else "MISMATCH"
    src = source_image(record["width"], record["height"])
    value = psnr_db(pixels, src) if pixels.shape == src.shape else float("nan")
    within = abs(value - record["psnr_db"]) <= PSNR_TOLERANCE_DB
    ps = f"ok ({value:.2f} dB)" if within else f"OUT OF TOLERANCE ({value:.2f} dB, recorded {record['psnr_db']:.2f})"
    other = kernel_differences(environment(pipe, pipe.device), record["recorded_on"])
    if not other:
        pix = "ok" if pixels_digest(pixels) == record["pixels_sha256"] else "MISMATCH"
    else:
        pix = f"other kernels ({'; '.join(other)}), {'within' if within else 'NOT within'} {PSNR_TOLERANCE_DB} dB"
    return VectorResult(name, sym, pix, ps)


def vector_files(model: str | None = None, root: Path = VECTOR_ROOT) -> list[Path]:
    pattern = f"{model}/format-*/*.osd" if model else "*/format-*/*.osd"
    return sorted(root.glob(pattern))


def make_record(pipe, data: bytes, width: int, height: int) -> dict:
    """The JSON record of `.osd` bytes coding `source_image(width, height)`: what decoding gives here."""
    header, _ = parse(data)
    pixels, symbols = decode_recording(pipe, data)
    sha, count = symbols_digest(symbols)
    return {
        "model": pipe.config.model_name, "model_hash": pipe.model_hash.hex(), "quality": header.quality,
        "width": width, "height": height, "bytes": len(data),
        "symbols_sha256": sha, "symbol_count": count,
        "pixels_sha256": pixels_digest(pixels), "psnr_db": round(psnr_db(pixels, source_image(width, height)), 4),
        "recorded_on": environment(pipe, pipe.device),
    }


def write_record(pipe, osd_path: Path, width: int, height: int) -> dict:
    """(Re)write the JSON record beside an `.osd` vector, leaving the vector itself untouched."""
    record = make_record(pipe, osd_path.read_bytes(), width, height)
    osd_path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def write_vector(pipe, folder: Path, name: str, width: int, height: int, quality) -> Path:
    """Code the generated image and record what decoding it gives here."""
    data = pipe.compress(source_image(width, height), quality=quality)
    folder = folder / pipe.config.model_name / f"format-{parse(data)[0].version}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.osd").write_bytes(data)
    write_record(pipe, folder / f"{name}.osd", width, height)
    return folder / f"{name}.osd"


__all__ = ["PSNR_TOLERANCE_DB", "VECTOR_ROOT", "VectorResult", "check_vector", "decode_recording", "environment",
           "kernel_differences", "make_record", "record_symbols", "source_image", "vector_files", "write_record",
           "write_vector"]
