"""ImageCodecPipeline: what every osdiff codec shares, whatever its networks.

    compress:   image -> pad right/bottom -> encode_padded (the codec's networks) -> strings
                [+ the image's mean colour, if the config sets `mean_colour`]
                -> `.osd` bytes (header + strings + CRC32; osdiff.entropy.bitstream)
    decompress: `.osd` bytes -> header checks against this model -> decode_strings -> crop
                [-> shift to the stored mean colour (osdiff.mean_colour)]

A subclass (OSDiffPipeline, BaselinePipeline) registers its components and provides
`pad_multiple`, `min_padded_side`, `num_quality_levels`, `num_strings()`, `encode_padded()`
and `decode_strings()`; `hashed_components` names the components whose weights the model hash
covers and `entropy_coder` the one that holds compressai's entropy models. A codec with gain
vectors sets `continuous_quality` and codes any quality in 1/256 steps; one whose encoding
starts with work that does not depend on the quality splits it into `analyse_padded` and
`encode_analysed`, so a target-size search (osdiff.rate) does that work once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from torch import Tensor

from .config import BitstreamLimits, ComputeConfig, RateControlConfig, TilingConfig
from .entropy.bitstream import HASH_BYTES, OSDHeader, header_bytes, pack, parse
from .errors import OSDiffError, OSDiffWarning, TargetUnreachable
from .imageio import ImageInput, pad_right_bottom, tensor_to_pil, to_tensor
from .mean_colour import MEAN_COLOUR_BYTES, match_mean_colour, mean_colour_bytes
from .rate import EncodeResult, check_quality, search_quality, target_size


@contextlib.contextmanager
def _onednn_on():
    """torch.backends.mkldnn.flags(enabled=True), whatever the caller set, without the TF32
    warning that CPU-only torch builds print on every use (filtered here, not globally: a
    caller's or pytest's catch_warnings would drop a global filter)."""
    flags = torch.backends.mkldnn.flags(enabled=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN", category=UserWarning)
        flags.__enter__()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN", category=UserWarning)
            flags.__exit__(None, None, None)


# model config settings added after models had shipped: at these defaults they are left out of
# the model hash, so the earlier models keep theirs (a training run carries them over too)
CODING_SETTINGS_SINCE_V2_1 = {"pad_multiple": None, "mean_colour": False}
# settings the model hash leaves out at these values (those models had before the setting existed):
# the coding settings above and the decoding settings `unet_max_quality` (osdiff-tiny v3.2) and `realism`
HASH_NEUTRAL_SETTINGS = {**CODING_SETTINGS_SINCE_V2_1, "unet_max_quality": None, "realism": 1.0}
# list-valued settings the model hash covers (other lists in a pipeline config name its components)
HASHED_LIST_SETTINGS = ("realism",)


def _hashed_config(config, neutral: dict) -> dict:
    """The config entries the model hash covers: private keys (`_...`) and settings at their
    hash-neutral value (`neutral`: key -> the value models had before the setting existed) left out."""
    as_list = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (a config read back has lists)
    return {k: v for k, v in config.items() if not k.startswith("_") and not (k in neutral and as_list(v) == neutral[k])}


@dataclass
class DecodeResult:
    """What `decompress_tensor` returns: the image (1,3,H,W) in [0,1] and its header."""

    image: Tensor
    header: OSDHeader


class ImageCodecPipeline(DiffusionPipeline):
    """Base of the osdiff codecs; see the module docstring."""

    hashed_components: tuple[str, ...] = ()
    entropy_coder: str = ""
    autocast_networks: bool = False  # whether ComputeConfig.precision applies (precision_context)

    def __init__(self) -> None:
        super().__init__()
        self.limits = BitstreamLimits()
        self.tiling = TilingConfig()
        self.compute = ComputeConfig()
        self.rate_control = RateControlConfig()
        self._model_hash: bytes | None = None

    # ---- what a subclass provides -------------------------------------------------------
    @property
    def pad_multiple(self) -> int:
        """Image height and width are padded to a multiple of this many pixels."""
        raise NotImplementedError

    @property
    def min_padded_side(self) -> int:
        """Smallest padded side in pixels."""
        return self.pad_multiple

    @property
    def num_quality_levels(self) -> int:
        raise NotImplementedError

    def num_strings(self) -> int:
        """Entropy-coded strings in every file of this model."""
        raise NotImplementedError

    @property
    def continuous_quality(self) -> bool:
        """True if any quality in 1/256 steps between levels can be coded (gain vectors)."""
        return False

    def encode_padded(self, image: Tensor, quality: int | float) -> list[bytes]:
        """Padded image (1,3,H,W) in [0,1] (float32) -> entropy-coded strings at the checked
        `quality` (1-based; fractional only if `continuous_quality`)."""
        raise NotImplementedError

    def analyse_padded(self, image: Tensor) -> object:
        """The part of encoding that does not depend on the quality (default: none)."""
        return image

    def encode_analysed(self, analysed: object, quality: int | float) -> list[bytes]:
        """`analyse_padded`'s result -> strings; equal to `encode_padded(image, quality)`."""
        return self.encode_padded(analysed, quality)

    def decode_strings(self, strings: list[bytes], header: OSDHeader, steps: int) -> Tensor:
        """Strings of a checked file -> padded image (1,3,H,W) in [0,1]."""
        raise NotImplementedError

    def pad_image(self, x: Tensor, pad_w: int, pad_h: int) -> Tensor:
        """Pad (1,3,H,W) on the right and bottom before coding (default: replicate)."""
        return pad_right_bottom(x, pad_w, pad_h)

    # ---- shared -------------------------------------------------------------------------
    @property
    def mean_colour(self) -> bool:
        """True if this model's files end with the original's mean colour (3 bytes, one more
        string; osdiff.mean_colour), which the decoder matches."""
        return bool(self.config.get("mean_colour", False))

    def file_strings(self) -> int:
        """Strings in every file of this model: the codec's, plus the mean colour if stored."""
        return self.num_strings() + int(self.mean_colour)

    def padded_side(self, side: int) -> int:
        """Pixels a side of `side` pixels is padded to before coding."""
        return max(-(-side // self.pad_multiple) * self.pad_multiple, self.min_padded_side)

    @property
    def model_hash(self) -> bytes:
        """First 8 bytes of SHA-256 over every weight (as float32), entropy table and config
        that affects decoding. Written in each file; a file from another model is refused."""
        if self._model_hash is None:
            digest = hashlib.sha256()
            settings = {k: v for k, v in _hashed_config(self.config, HASH_NEUTRAL_SETTINGS).items()
                        if not isinstance(v, (list, tuple)) or k in HASHED_LIST_SETTINGS}  # lists: the components
            if settings.get("decoding_start") == "hint":  # the v1 procedure: v1 models keep their hash
                del settings["decoding_start"]
            digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
            if getattr(self, "scheduler", None) is not None:
                schedule = {k: v for k, v in self.scheduler.config.items() if not k.startswith("_")}
                digest.update(json.dumps(schedule, sort_keys=True, default=str).encode())
            for name in self.hashed_components:
                module = getattr(self, name)
                architecture = _hashed_config(module.config, getattr(module, "hash_neutral_defaults", {}))
                digest.update(json.dumps(architecture, sort_keys=True, default=str).encode())
                tensors = dict(module.state_dict())
                if name == self.entropy_coder:
                    tensors.update({f"tables.{k}": v for k, v in module.entropy_tables().items()})
                for key in sorted(tensors):
                    t = tensors[key].detach()
                    t = t.float() if t.is_floating_point() else t.long()
                    digest.update(f"{name}.{key}:{tuple(t.shape)}".encode())
                    digest.update(t.cpu().contiguous().numpy().tobytes())
            self._model_hash = digest.digest()[:HASH_BYTES]
        return self._model_hash

    def check_quality(self, quality: int | float | None) -> int | float:
        """The quality to code (None: the model's default), as the header will store it: rounded
        to 1/256 steps, an int for a whole level. OSDiffError outside 1 .. num_quality_levels, or
        fractional for a model without gain vectors (osdiff.rate.check_quality)."""
        q = self.config.default_quality if quality is None else quality
        return check_quality(q, self.num_quality_levels, self.continuous_quality)

    def min_file_bytes(self) -> int:
        """Smallest possible file of this model (the header with empty strings), in bytes."""
        return header_bytes(self.config.model_name, self.file_strings()) + MEAN_COLOUR_BYTES * self.mean_colour

    def _prepare(self) -> None:
        coder = getattr(self, self.entropy_coder)
        if not coder.is_updated():
            coder.update(force=True)
            self._model_hash = None

    @contextlib.contextmanager
    def coding_context(self):
        """Run the networks as `self.compute` says (see ComputeConfig); restores torch's settings."""
        if not self.compute.deterministic or self.device.type != "cpu":
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.compute.threads)
        try:
            with _onednn_on():
                yield
        finally:
            torch.set_num_threads(before)

    @property
    def network_precision(self) -> str:
        """What `precision_context` runs the networks in here, 'float32' or 'bfloat16': float32
        for a codec whose networks it does not wrap (`autocast_networks` False), else
        ComputeConfig.precision ('auto': bfloat16 on a CPU that multiplies it natively,
        osdiff.kernels.native_bf16)."""
        from .kernels import native_bf16

        precision = self.compute.precision if self.autocast_networks else "float32"
        if precision == "auto":
            precision = "bfloat16" if self.device.type == "cpu" and native_bf16() else "float32"
        return precision

    def precision_context(self):
        """torch.autocast to bfloat16 when `network_precision` says so, else nothing. A subclass
        wraps its latent autoencoder and denoiser in it, never its entropy networks."""
        if self.network_precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ---- encoding -----------------------------------------------------------------------
    def compress(self, image: ImageInput, quality: int | float | None = None, *, target_bpp: float | None = None,
                 target_bytes: int | None = None, strict: bool = False) -> bytes:
        """Image (path, PIL, numpy or torch; see osdiff.imageio) -> `.osd` bytes; the arguments
        are those of `encode`, which also reports the quality reached and the encodes made."""
        return self.encode(image, quality, target_bpp=target_bpp, target_bytes=target_bytes, strict=strict).data

    @torch.inference_mode()
    def encode(self, image: ImageInput, quality: int | float | None = None, *, target_bpp: float | None = None,
               target_bytes: int | None = None, strict: bool = False) -> EncodeResult:
        """Image -> EncodeResult (the `.osd` bytes, the quality stored, encodes made).

        quality: 1 .. num_quality_levels (default: the model's default), a real number in 1/256
        steps if `continuous_quality` (rounded to the nearest step), else an integer.
        target_bytes (bytes) or target_bpp (bits per pixel of the original image): instead of a
        quality, the highest quality whose file fits (osdiff.rate.search_quality; at most
        `rate_control.max_encodes` encodes). If even the lowest quality is larger, that file is
        returned with fits=False and an OSDiffWarning, or, with `strict`, TargetUnreachable (an
        OSDiffError) is raised.
        A target below `min_file_bytes()` is an OSDiffError."""
        targeted = target_bpp is not None or target_bytes is not None
        if targeted and quality is not None:
            raise OSDiffError("give a quality or a target size, not both")
        checked = None if targeted else self.check_quality(quality)
        self._prepare()
        x = to_tensor(image)
        _, _, height, width = x.shape
        if width > self.limits.max_side or height > self.limits.max_side or width * height > self.limits.max_pixels:
            raise OSDiffError(f"image of {width}x{height} pixels is larger than this codec accepts")
        target = target_size(width, height, target_bpp, target_bytes) if targeted else None
        if target is not None and target < self.min_file_bytes():
            raise OSDiffError(f"target of {target} bytes is below the smallest file this model can write "
                              f"({self.min_file_bytes()} bytes of header)")
        side = [mean_colour_bytes(x)] if self.mean_colour else []
        pad_w, pad_h = self.padded_side(width) - width, self.padded_side(height) - height
        x = self.pad_image(x, pad_w, pad_h)
        with self.coding_context():
            analysed = self.analyse_padded(x)

            def encode_at(q: int | float) -> bytes:
                strings = self.encode_analysed(analysed, q) + side
                return pack(OSDHeader(self.config.model_name, self.model_hash, q, width, height, pad_w, pad_h), strings)

            if target is None:
                return EncodeResult(encode_at(checked), checked)
            result = search_quality(encode_at, self.num_quality_levels, self.continuous_quality, target, self.rate_control)
        if not result.fits:
            message = (f"even the lowest quality gives {len(result.data)} bytes, over the target of {target} bytes")
            if strict:
                raise TargetUnreachable(message)
            warnings.warn(message + "; wrote the lowest quality", OSDiffWarning, stacklevel=3)
        return result

    # ---- decoding -----------------------------------------------------------------------
    def read_header(self, data: bytes) -> tuple[OSDHeader, list[bytes]]:
        """Parse `data` and check that this model can decode it."""
        header, strings = parse(data, self.limits)
        self._prepare()
        if header.model_hash != self.model_hash or header.model_name != self.config.model_name:
            raise OSDiffError(
                f"file was made by model {header.model_name!r} ({header.model_hash.hex()}), "
                f"not by the loaded model {self.config.model_name!r} ({self.model_hash.hex()})"
            )
        check_quality(header.quality, self.num_quality_levels, self.continuous_quality, what="the file's quality")
        if (header.pad_w, header.pad_h) != (self.padded_side(header.width) - header.width, self.padded_side(header.height) - header.height):
            raise OSDiffError("corrupted header (padding does not match the model)")
        if len(strings) != self.file_strings():
            raise OSDiffError(f"corrupted file: {len(strings)} strings, the model codes {self.file_strings()}")
        return header, strings

    def default_steps(self, quality: int | float) -> int:
        """Decoding steps a file of `quality` takes unless told (one pass here)."""
        return 1

    @torch.inference_mode()
    def decompress_tensor(self, data: bytes, steps: int | None = None) -> DecodeResult:
        """`.osd` bytes -> image tensor (1,3,H,W) in [0,1]; `steps` (None: the model's
        `default_steps` for the file's quality) > 1: multi-step diffusion decoding, 0: none, for
        the codecs that have it."""
        header, strings = self.read_header(data)
        steps = self.default_steps(header.quality) if steps is None else steps
        side = strings.pop() if self.mean_colour else None
        with self.coding_context():
            image = self.decode_strings(strings, header, steps)[:, :, : header.height, : header.width]
            if side is not None:
                image = match_mean_colour(image, side)
        return DecodeResult(image.cpu(), header)

    def decompress(self, data: bytes, steps: int | None = None) -> Image.Image:
        """`.osd` bytes -> PIL RGB image of the original size."""
        return tensor_to_pil(self.decompress_tensor(data, steps=steps).image)

    def __call__(self, image: ImageInput, quality: int | float | None = None, steps: int | None = None) -> tuple[Image.Image, bytes]:
        """Round trip: compress `image`, then decode it."""
        data = self.compress(image, quality)
        return self.decompress(data, steps=steps), data
