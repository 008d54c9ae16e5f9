"""Latency and memory of encoding and decoding, one step versus N steps, same network.

Every component is timed separately (median and spread over repeats after warm-up, CUDA
synchronised), and full decodes are timed at each step count, so the measured N-step/1-step
ratio can be set against the ideal one from the components:
    ideal(N) = (N*u + x) / (u + x),  u = one control+UNet step, x = the rest of decoding.
"""
from __future__ import annotations

import platform
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .errors import OSDiffError
from .imageio import pad_right_bottom
from .models.autoencoder import LATENT_DOWNSCALE, decode_latent, encode_latent
from .pipeline import to_channels_last
from .rate import level_index

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    iqr_s: float
    repeats: int

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        return cls(statistics.median(samples), min(samples), max(samples), q[2] - q[0], len(samples))


@dataclass
class BenchResult:
    model: str
    device: str
    dtype: str
    size: tuple[int, int]  # (height, width) in pixels
    threads: int
    torch_version: str
    random_weights: bool
    encode: dict[str, Timing] = field(default_factory=dict)
    decode: dict[str, Timing] = field(default_factory=dict)
    decode_total: dict[int, Timing] = field(default_factory=dict)
    ratio_measured: dict[int, float] = field(default_factory=dict)
    ratio_ideal: dict[int, float] = field(default_factory=dict)
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    bits_per_pixel: float = 0.0
    deterministic: bool = True  # ComputeConfig.deterministic while measuring
    precision: str = "float32"  # what the autoencoder and UNet computed in (the codec's network_precision)
    note: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["decode_total"] = {str(k): v for k, v in d["decode_total"].items()}
        d["ratio_measured"] = {str(k): v for k, v in self.ratio_measured.items()}
        d["ratio_ideal"] = {str(k): v for k, v in self.ratio_ideal.items()}
        return d


class MemoryMeter:
    """Peak memory during a block: CUDA allocator peak, or sampled process RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @contextmanager
    def measure(self, store: dict, key: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            store[key] = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
            return
        import psutil

        proc, peak, stop = psutil.Process(), [0], threading.Event()
        base = proc.memory_info().rss

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            store[key] = max(0, max(peak[0], proc.memory_info().rss) - base) / 2**20


def _timer(device: torch.device, warmup: int, repeat: int) -> Callable[[Callable[[], object]], Timing]:
    def run(fn):
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - start)
        return Timing.of(samples)

    return run


def benchmark(codec, size: tuple[int, int], steps: list[int], device: str = "cpu", dtype: str = "fp32",
              repeat: int = 3, warmup: int = 1, model_label: str = "", random_weights: bool = False) -> BenchResult:
    """Time `codec` on a random image of `size` = (height, width), every stage run as
    `codec.compute` says (deterministic by default; see ComputeConfig). An OSDiffPipeline is
    timed per component and per step count; a codec without diffusion (BaselinePipeline) only
    as whole encodes and one-pass decodes."""
    from .official_pipeline import OfficialOSDiffPipeline
    from .pipeline import OSDiffPipeline

    codec.to(torch.device(device))
    if isinstance(codec, OfficialOSDiffPipeline):
        if steps != [1]:
            raise OSDiffError(f"{model_label or codec.config.model_name} is a converted official model: it decodes in one step (--steps 1)")
        with codec.coding_context():
            return _measure_official(codec, size, device, dtype, repeat, warmup, model_label, random_weights)
    if not isinstance(codec, OSDiffPipeline) and steps != [1]:
        raise OSDiffError(f"{model_label or codec.config.model_name} is not a diffusion codec: it decodes in one pass (--steps 1)")
    measure = _measure if isinstance(codec, OSDiffPipeline) else _measure_one_pass
    with codec.coding_context():
        return measure(codec, size, steps, device, dtype, repeat, warmup, model_label, random_weights)


def _coded_test_image(codec, size, dev, dtype, model_label, random_weights):
    """(random image (1,3,H,W), its `.osd` bytes, an empty BenchResult for it); compressing
    also computes and caches the model hash, so no timed run pays for it."""
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    data = codec.compress(image)
    result = BenchResult(
        model=model_label, device=_device_name(dev), dtype=dtype, size=size, threads=torch.get_num_threads(),
        torch_version=torch.__version__, random_weights=random_weights,
        bits_per_pixel=len(data) * 8 / (size[0] * size[1]), deterministic=codec.compute.deterministic,
        precision=codec.network_precision,
        note="weights are random: timings do not depend on weight values" if random_weights else "",
    )
    return image, data, result


@torch.inference_mode()
def _measure_one_pass(codec, size, steps, device, dtype, repeat, warmup, model_label, random_weights) -> BenchResult:
    """Whole encode and decode of a codec without diffusion (fp32 only)."""
    if dtype != "fp32":
        raise OSDiffError(f"{model_label}: only fp32 is supported for codecs without diffusion")
    dev = torch.device(device)
    time_it, mem = _timer(dev, warmup, repeat), MemoryMeter(dev)
    image, data, result = _coded_test_image(codec, size, dev, dtype, model_label, random_weights)
    result.encode["total"] = time_it(lambda: codec.compress(image))
    result.decode_total[1] = time_it(lambda: codec.decompress_tensor(data))
    with mem.measure(result.peak_memory_mb, "encode"):
        codec.compress(image)
    with mem.measure(result.peak_memory_mb, "decode_1_steps"):
        codec.decompress_tensor(data)
    result.ratio_measured[1] = result.ratio_ideal[1] = 1.0
    return result


@torch.inference_mode()
def _measure(codec, size, steps, device, dtype, repeat, warmup, model_label, random_weights) -> BenchResult:
    dev = torch.device(device)
    for part in (codec.vae, codec.unet, codec.conditioning):  # the compressor stays fp32
        part.to(DTYPES[dtype])
    codec._model_hash = None
    time_it = _timer(dev, warmup, repeat)
    mem = MemoryMeter(dev)
    image, data, result = _coded_test_image(codec, size, dev, dtype, model_label, random_weights)
    header, strings = codec.read_header(data)
    strings = strings[: codec.num_strings()]  # the compressor's (without a stored mean colour)

    # --- encoding components
    x = (pad_right_bottom(image, header.pad_w, header.pad_h) * 2 - 1).to(dev, DTYPES[dtype])
    latent = encode_latent(codec.vae, x).float()
    level = level_index(header.quality)
    comp = codec.compressor
    gains = comp.coding_gains(level)
    y = comp.g_a(latent)
    autocast = codec.precision_context  # the autoencoder and the UNet run in it, as in compress/decompress

    def encode_image() -> Tensor:
        with autocast():
            return encode_latent(codec.vae, to_channels_last(x))

    result.encode["autoencoder_encode"] = time_it(encode_image)
    result.encode["analysis"] = time_it(lambda: comp.g_a(latent))

    def entropy_encode() -> dict:
        with comp.coding_context():  # the exact entropy parameters, as compress runs them
            return comp.latent_codec.compress(y, *gains)

    result.encode["entropy_encode"] = time_it(entropy_encode)
    result.encode["total"] = time_it(lambda: codec.compress(image))
    with mem.measure(result.peak_memory_mb, "encode"):  # a separate, untimed run: sampling costs CPU
        codec.compress(image)

    # --- decoding components
    latent_hw = (x.shape[-2] // LATENT_DOWNSCALE, x.shape[-1] // LATENT_DOWNSCALE)
    shapes = comp.code_shapes(latent_hw)
    nested = [[s] for s in strings]
    y_hat = comp.latent_codec.decompress(nested, shapes, gains[2], gains[3])["y_hat"]
    hint = comp.g_s(y_hat).to(DTYPES[dtype])
    context = codec.conditioning(1).to(hint.dtype)
    t = int(codec.config.timestep)
    x_t = codec.start_latent(hint)
    x_t, hint_cl = to_channels_last(x_t), to_channels_last(hint)  # as decode_hint feeds the networks

    def entropy_decode() -> dict:
        with comp.coding_context():
            return comp.latent_codec.decompress(nested, shapes, gains[2], gains[3])

    result.decode["entropy_decode"] = time_it(entropy_decode)
    result.decode["synthesis"] = time_it(lambda: comp.g_s(y_hat))

    def unet_step() -> Tensor:
        with autocast():
            return codec.unet(x_t, t, encoder_hidden_states=context, controlnet_cond=hint_cl,
                              conditioning_scale=codec.config.control_scale).sample

    def decode_image() -> Tensor:
        with autocast():
            return decode_latent(codec.vae, hint_cl)

    result.decode["unet_step"] = time_it(unet_step)
    result.decode["autoencoder_decode"] = time_it(decode_image)
    u = result.decode["unet_step"].median_s
    rest = sum(result.decode[k].median_s for k in ("entropy_decode", "synthesis", "autoencoder_decode"))

    for n in steps:
        result.decode_total[n] = time_it(lambda n=n: codec.decompress_tensor(data, steps=n))
        with mem.measure(result.peak_memory_mb, f"decode_{n}_steps"):
            codec.decompress_tensor(data, steps=n)
    one = result.decode_total.get(1) or result.decode_total[min(steps)]
    for n in steps:
        result.ratio_measured[n] = result.decode_total[n].median_s / one.median_s
        result.ratio_ideal[n] = (n * u + rest) / (u + rest)
    return result


@torch.inference_mode()
def _measure_official(codec, size, device, dtype, repeat, warmup, model_label, random_weights) -> BenchResult:
    """A converted official model: its components, and the entropy coding in both modes (the
    exact mode runs the entropy networks on the CPU in float64 fixed point; the float mode is
    the official arithmetic on the model's device)."""
    from .models.official.cddm import controlled_unet_forward

    dev = torch.device(device)
    for part in (codec.vae, codec.unet, codec.conditioning, codec.levels.controls):  # the compressors stay fp32
        part.to(DTYPES[dtype])
    codec._model_hash = None
    time_it, mem = _timer(dev, warmup, repeat), MemoryMeter(dev)
    image, data, result = _coded_test_image(codec, size, dev, dtype, model_label, random_weights)
    header, strings = codec.read_header(data)
    x = codec.pad_image(image, header.pad_w, header.pad_h).to(dev)
    comp = codec.levels.compressors[level_index(header.quality)]
    control = codec.levels.controls[level_index(header.quality)]
    latent = codec.encode_latent(x).float()
    float_strings = comp.compress(latent, exact=False)["strings"]
    z_shape = ((header.height + header.pad_h) // 64, (header.width + header.pad_w) // 64)
    result.encode["autoencoder_encode"] = time_it(lambda: codec.encode_latent(x))
    result.encode["analysis"] = time_it(lambda: comp.hyper_enc(comp.encoder(latent)))
    result.encode["compress_exact"] = time_it(lambda: comp.compress(latent, exact=True))
    result.encode["compress_float"] = time_it(lambda: comp.compress(latent, exact=False))
    result.encode["total"] = time_it(lambda: codec.compress(image))
    with mem.measure(result.peak_memory_mb, "encode"):
        codec.compress(image)
    y_hat = comp.decompress_y(strings[1:], z_shape, exact=True)
    hint = comp.decoder(y_hat).to(DTYPES[dtype])
    x_t = torch.randn(hint.shape, generator=torch.Generator().manual_seed(0)).to(hint)
    context = codec.conditioning(1).to(hint.dtype)
    t = torch.full((1,), 999, dtype=torch.long, device=dev)
    result.decode["entropy_decode_exact"] = time_it(lambda: comp.decompress_y(strings[1:], z_shape, exact=True))
    result.decode["entropy_decode_float"] = time_it(lambda: comp.decompress_y(float_strings, z_shape, exact=False))
    result.decode["synthesis"] = time_it(lambda: comp.decoder(y_hat))
    result.decode["unet_step"] = time_it(lambda: controlled_unet_forward(control, codec.unet, x_t, t, context, hint))
    result.decode["autoencoder_decode"] = time_it(lambda: codec.vae.decode(x_t.to(codec.vae.dtype)).sample)
    result.decode_total[1] = time_it(lambda: codec.decompress_tensor(data))
    with mem.measure(result.peak_memory_mb, "decode_1_steps"):
        codec.decompress_tensor(data)
    result.ratio_measured[1] = result.ratio_ideal[1] = 1.0
    return result


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(r: BenchResult) -> str:
    h, w = r.size
    mode = "deterministic" if r.deterministic else "fast"
    lines = [f"osdiff bench: {r.model} | {h}x{w} px | {r.device} | {r.dtype} weights, {r.precision} compute | {mode} | "
             f"torch {r.torch_version} | {r.bits_per_pixel:.4f} bpp"]
    if r.note:
        lines.append(f"note: {r.note}")
    row = "{:<28}{:>12}{:>12}{:>12}{:>12}"
    lines.append(row.format("stage", "median s", "min s", "max s", "IQR s"))
    for section, timings in (("encode", r.encode), ("decode", r.decode)):
        for name, t in timings.items():
            lines.append(row.format(f"{section}.{name}", f"{t.median_s:.4f}", f"{t.min_s:.4f}", f"{t.max_s:.4f}", f"{t.iqr_s:.4f}"))
    for n, t in r.decode_total.items():
        lines.append(row.format(f"decode.total[{n} step{'s' if n > 1 else ''}]", f"{t.median_s:.4f}", f"{t.min_s:.4f}", f"{t.max_s:.4f}", f"{t.iqr_s:.4f}"))
    lines.append("")
    lines.append("{:<10}{:>14}{:>14}{:>12}".format("steps", "measured x", "ideal x", "deviation"))
    for n in r.decode_total:
        m, i = r.ratio_measured[n], r.ratio_ideal[n]
        lines.append("{:<10}{:>14.2f}{:>14.2f}{:>11.1f}%".format(n, m, i, 100 * (m - i) / i))
    lines.append("")
    lines.append("peak memory (MB above baseline): " + ", ".join(f"{k} {v:.0f}" for k, v in r.peak_memory_mb.items()))
    return "\n".join(lines)
