"""Codecs under evaluation, each `encode(image, setting) -> (bytes, decoded RGB image)`.

Classical codecs run through Pillow (JPEG, WebP, AVIF built in; JPEG XL with the
pillow-jxl-plugin), swept over their quality settings; rate is the real file size."""
from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from typing import Callable

from PIL import Image, features

from ..errors import OSDiffError


@dataclass
class Codec:
    """`encode_bytes(image, setting) -> file bytes`, `decode_bytes(bytes) -> RGB image`.
    `settings`: quality settings swept in evaluation, low rate first; `quality_range`:
    every integer setting the codec accepts (for matching a file size); `continuous`: a
    learned codec that also codes qualities between its levels (gain vectors)."""

    name: str
    settings: list
    encode_bytes: Callable[[Image.Image, object], bytes] = field(repr=False)
    decode_bytes: Callable[[bytes], Image.Image] = field(repr=False)
    quality_range: tuple[int, int] = (1, 100)
    mime: str = "application/octet-stream"
    suffix: str = ".bin"
    learned: bool = False
    continuous: bool = False
    # what makes its files: a learned codec's model hash (and decoding option), a classical one's
    # encoder options; an evaluation folder keeps it per name (osdiff.evaluation.runner)
    identity: str = ""

    def encode(self, image: Image.Image, setting) -> tuple[bytes, Image.Image]:
        """(file bytes, the decoded RGB image)."""
        data = self.encode_bytes(image, setting)
        return data, self.decode_bytes(data)


def _pillow_encoder(fmt: str, **extra) -> Callable[[Image.Image, int], bytes]:
    def encode(image: Image.Image, quality: int) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, quality=int(quality), **extra)
        return buf.getvalue()

    encode.identity = f"Pillow {fmt} " + " ".join(f"{k}={v}" for k, v in sorted(extra.items()))
    return encode


def _classical(name: str, settings: list, fmt: str, quality_range: tuple[int, int], mime: str, suffix: str,
               **extra) -> Codec:
    encode = _pillow_encoder(fmt, **extra)
    return Codec(name, settings, encode, _pillow_decode, quality_range, mime, suffix, identity=encode.identity)


def _pillow_decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as decoded:
        return decoded.convert("RGB")


def classical_codec(name: str) -> Codec:
    if name == "jpeg":
        return _classical("jpeg", [1, 3, 5, 10, 15, 20, 30, 40, 50, 65, 80, 90], "JPEG", (1, 95), "image/jpeg", ".jpg",
                          optimize=True)
    if name == "webp":
        return _classical("webp", [0, 5, 10, 20, 30, 45, 60, 75, 90], "WEBP", (0, 100), "image/webp", ".webp", method=6)
    if name == "avif":
        if not features.check("avif"):
            raise OSDiffError("avif: this Pillow has no AVIF support")
        return _classical("avif", [0, 5, 10, 20, 30, 40, 50, 60, 70, 80], "AVIF", (0, 100), "image/avif", ".avif",
                          speed=6)
    if name == "jxl":
        try:
            import pillow_jxl  # noqa: F401
        except ImportError:
            raise OSDiffError("jxl: install pillow-jxl-plugin for JPEG XL") from None
        return _classical("jxl", [5, 10, 20, 30, 40, 55, 70, 85], "JXL", (1, 100), "image/jxl", ".jxl", effort=7)
    raise OSDiffError(f"unknown codec {name!r}")


CLASSICAL = ("jpeg", "webp", "avif", "jxl")
OPTIONS = ("steps", "precision", "realism")  # a learned codec's `:KEY=VALUE` options, in label order


def learned_codec(name: str, model=None, verbose: bool = False, steps: int | None = None,
                  precision: str | None = None, realism: float | None = None) -> Codec:
    """A learned codec (osdiff or a baseline such as elic-tiny); `model` is a shipped name, a
    folder or a loaded pipeline (default: the shipped model called `name`); `verbose` as in
    `osdiff.load`; `steps`: the decoding option `osdiff decompress --steps` (None: the default;
    0 decodes the hint latent without the UNet); `precision`: ComputeConfig.precision (None:
    the pipeline's); `realism`: `osdiff decompress --realism` (None: the model's). The identity
    names bfloat16 when the networks run in it and a realism other than the model's, so a
    results folder never mixes them with the default rows."""
    from ..codec_pipeline import ImageCodecPipeline
    from ..config import check_realism
    from ..hub import load

    pipe = model if isinstance(model, ImageCodecPipeline) else load(model or name, verbose=verbose)
    if precision is not None:
        pipe.compute = replace(pipe.compute, precision=precision)
    if realism is not None:
        if not hasattr(pipe, "realism_override"):
            raise OSDiffError(f"{name!r}: ':realism' is a decoding option of osdiff's own models; this one does not take it")
        pipe.realism_override = realism
    levels = pipe.num_quality_levels
    decode = pipe.decompress if steps is None else (lambda data: pipe.decompress(data, steps=steps))
    identity = f"{pipe.config.model_name} {pipe.model_hash.hex()}" + ("" if steps is None else f" steps={steps}")
    if pipe.network_precision != "float32":
        identity += f" {pipe.network_precision}"
    if realism is not None and realism != check_realism(pipe.config.get("realism", 1.0)):
        identity += f" realism={realism:g}"
    return Codec(name, list(range(1, levels + 1)), lambda image, quality: pipe.compress(image, quality=quality),
                 decode, (1, levels), "application/x-osdiff", ".osd", learned=True,
                 continuous=pipe.continuous_quality, identity=identity)


def parse_qualities(text: str) -> list[int | float]:
    """'1,1.5,2' -> [1, 1.5, 2]: each rounded to the 1/256 steps a file stores (an int for a
    whole level), sorted, duplicates dropped."""
    from ..entropy.bitstream import QUALITY_STEPS, quality_from_steps

    values = set()
    for item in (t.strip() for t in text.split(",")):
        try:
            q = float(item)
        except ValueError:
            raise OSDiffError(f"--qualities must be comma-separated numbers, got {item!r}") from None
        if not q >= 1 or q == float("inf"):
            raise OSDiffError(f"--qualities: each quality must be at least 1, got {item!r}")
        values.add(round(q * QUALITY_STEPS))
    return [quality_from_steps(v) for v in sorted(values)]


def with_qualities(codec: Codec, qualities: list[int | float]) -> Codec:
    """`codec` swept at `qualities` if it is a learned codec with gain vectors (OSDiffError if one
    is above its highest level); any other codec unchanged."""
    if not codec.continuous:
        return codec
    top = codec.quality_range[1]
    if qualities[-1] > top:
        raise OSDiffError(f"--qualities: {codec.name} has qualities 1 to {top}, not {qualities[-1]}")
    return replace(codec, settings=list(qualities))


def make_codec(spec: str, model: str | None = None, verbose: bool = False) -> Codec:
    """`spec`: a classical codec (jpeg, webp, avif, jxl), a learned model's name (shipped, or
    loaded from `model`), or NAME=FOLDER for a learned model in FOLDER shown as NAME; a learned
    one may end in coding options, `:steps=N`, `:precision=P` (ComputeConfig.precision) and
    `:realism=R` (DecodingConfig.realism; e.g. osdiff-tiny:steps=0, osdiff-tiny:precision=float32,
    osdiff-tiny:realism=0.8), kept in its name."""
    from ..config import PRECISIONS, check_realism

    base, options = spec, {}
    while ":" in base and base.rsplit(":", 1)[1].partition("=")[0] in OPTIONS:
        base, option = base.rsplit(":", 1)
        key, _, value = option.partition("=")
        if key == "steps" and not value.isdigit():
            raise OSDiffError(f"{spec!r}: the decoding option must be ':steps=N' (N = 0, 1, 2, ...)")
        if key == "precision" and value not in PRECISIONS:
            raise OSDiffError(f"{spec!r}: ':precision' must be one of {', '.join(PRECISIONS)}")
        if key == "realism":
            try:
                check_realism(float(value))
            except ValueError:
                raise OSDiffError(f"{spec!r}: ':realism' must be a number from 0 to 1") from None
        options.setdefault(key, value)
    if ":" in base and "=" in base.rsplit(":", 1)[1]:
        raise OSDiffError(f"{spec!r}: a coding option must be ':steps=N', ':precision=P' or ':realism=R'")
    name, _, folder = base.partition("=")
    label = name + "".join(f":{k}={options[k]}" for k in OPTIONS if k in options)
    if name in CLASSICAL:
        if options:
            raise OSDiffError(f"{spec!r}: ':steps', ':precision' and ':realism' are options of learned codecs")
        return classical_codec(name)
    steps = int(options["steps"]) if "steps" in options else None
    realism = float(options["realism"]) if "realism" in options else None
    return learned_codec(label, folder or model or name, verbose, steps, options.get("precision"), realism)
