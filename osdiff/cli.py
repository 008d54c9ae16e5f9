"""Command line: `osdiff compress|decompress|info`.

Every failure the user can cause prints one line `osdiff: error: ...` on stderr and exits
non-zero; outputs are written atomically and never overwrite without --force.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import warnings
from pathlib import Path

from .config import PRECISIONS
from .errors import OSDiffError, OSDiffWarning

EXIT_ERROR = 1
EXIT_USAGE = 2
VERBOSE_HELP = "also show the libraries' model-loading progress bars, log messages and warnings"
FAST_HELP = "torch's default CPU kernels and threads: faster, but decoded pixels may differ by a level between thread counts"
PRECISION_HELP = ("what the autoencoder and the UNet step compute in: auto (default) = bfloat16 on a CPU that multiplies it "
                  "in hardware (AMX or AVX512-BF16; coding ~2.5x faster), else float32; float32 = the reference arithmetic")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"osdiff: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="osdiff", description="One-step diffusion perceptual image compression.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="images -> .osd files")
    c.add_argument("inputs", nargs="+", metavar="IN", help="image files or folders of images")
    c.add_argument("-o", "--output", metavar="OUT", help="output file (one input) or folder")
    rate = c.add_mutually_exclusive_group()
    rate.add_argument("-q", "--quality", type=float, default=None,
                      help="quality from 1 (fewest bits) to the model's highest level; between levels (e.g. 2.5, in 1/256 steps) "
                           "for models with gain vectors")
    rate.add_argument("--bpp", default=None, help="target bits per pixel: the highest quality whose file fits, per image")
    rate.add_argument("--size", default=None, help="target file size per image: bytes, or with a unit: 20kB (1000 bytes), 20KiB (1024)")
    c.add_argument("--strict", action="store_true", help="with --bpp/--size: an image that does not fit even at the lowest "
                   "quality is an error (nothing written) instead of a warning")
    c.add_argument("-m", "--model", default=None, help="shipped model name or model folder (default osdiff-tiny)")
    c.add_argument("-f", "--force", action="store_true", help="overwrite existing outputs")
    c.add_argument("--fast", action="store_true", help=FAST_HELP)

    d = sub.add_parser("decompress", help=".osd files -> PNG images")
    d.add_argument("inputs", nargs="+", metavar="IN", help=".osd files or folders of them")
    d.add_argument("-o", "--output", metavar="OUT", help="output file (one input) or folder")
    d.add_argument("-m", "--model", default=None, help="model name or folder (default: the model named in the file)")
    d.add_argument("--steps", type=int, default=None, help="denoising steps (1 = one-step decoding; >1 uses DDIM; "
                   "0 = no UNet, the compressed latent decoded directly: faster, smoother; default: the model's "
                   "choice for the file's quality, one step or, above the model's unet_max_quality, none)")
    d.add_argument("--realism", type=float, default=None, metavar="R",
                   help="with the UNet step: how much of the step's change to the compressed latent to keep, from 0 "
                   "(the latent as decoded with --steps 0) to 1 (the step's output); lower = less added texture, "
                   "closer colours; default: the model's (osdiff-tiny: 1)")
    d.add_argument("-f", "--force", action="store_true", help="overwrite existing outputs")
    d.add_argument("--fast", action="store_true", help=FAST_HELP)

    i = sub.add_parser("info", help="print the header of .osd files")
    i.add_argument("inputs", nargs="+", metavar="FILE")
    i.add_argument("--json", action="store_true", help="one JSON object per line")
    b = sub.add_parser("bench", help="latency and memory: one-step vs N-step decoding")
    b.add_argument("--model", default="osdiff-tiny", help="osdiff-tiny, sd21-arch (SD 2.1 shapes, random weights), official-arch "
                   "(the paper's full-size model, random weights; --steps 1) or a model folder "
                   "(a baseline codec's or converted official model's folder too, with --steps 1)")
    b.add_argument("--size", default="512x768", help="HEIGHTxWIDTH in pixels")
    b.add_argument("--steps", default="1,20,50", help="comma-separated step counts")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--fast", action="store_true", help=FAST_HELP)

    e = sub.add_parser("eval", help="rate-distortion evaluation against classical codecs, with an HTML report")
    e.add_argument("data_dir", nargs="+", help="folder(s) of images; with several, rows are named folder/file")
    e.add_argument("--codecs", default="osdiff-tiny,jpeg,webp,avif,jxl",
                   help="comma-separated: jpeg, webp, avif, jxl, a learned model's name (osdiff-tiny, hific-tiny, ...) "
                        "or NAME=FOLDER for a model folder (e.g. elic-tiny=../runs/elic-tiny/model); a learned codec may end in "
                        "a decoding option, e.g. osdiff-tiny:steps=0 (the hint latent decoded without the UNet)")
    e.add_argument("--model", default=None, help="model folder for the osdiff-* codec (default: the shipped model of that name)")
    e.add_argument("--out", required=True, help="results folder (resumes if it holds an earlier run)")
    e.add_argument("--qualities", default=None, help="comma-separated qualities (e.g. 1,1.5,2,2.5,3) for every learned codec with "
                   "gain vectors, for dense RD curves (default: its whole levels); codecs without gains keep their levels")
    e.add_argument("--anchor", default="jpeg", help="BD-rate anchor codec")
    e.add_argument("--limit", type=int, default=None, help="only the first N images of each folder")
    e.add_argument("--crop-bpp", type=float, default=None,
                   help="side-by-side crops with each codec at the setting closest to this bpp (default: the first learned codec's middle level)")
    e.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex",
                   help="LPIPS backbone: alex (the field's metric, column lpips; default) or vgg (column lpips_vgg)")
    e.add_argument("--metrics", default=None,
                   help="comma-separated metrics to measure (default: all): lpips, dists, psnr, ms_ssim, haarpsi, ms_gmsd, "
                        "vsi, fsim, vif, delta_e, delta_e_saturated, spurious_texture, grid_texture, detail_retention, colour_shift, kid_taef2 "
                        "(FID and KID are always measured); "
                        "a later run with more fills them in")
    e.add_argument("--reference", choices=("kodak", "tecnick", "clic2020"), default=None,
                   help="draw the published points of this dataset (DiffEIC's table) on the plots and add BD-rates "
                        "against them (other images, machines and protocol: for placing, not for ranking)")
    e.add_argument("--no-crops", action="store_true", help="skip the side-by-side crops")

    t = sub.add_parser("train", help="train a codec from a YAML/TOML config (resumes automatically)")
    t.add_argument("--config", required=True, help="configs/tiny.yaml, configs/sd21.yaml, ...")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (checkpointed)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop after this long (checkpointed)")
    t.add_argument("--device", choices=("auto", "cpu"), default=None,
                   help="auto: a GPU when there is one (accelerate's choice); cpu: force the CPU (default: the config's)")
    t.add_argument("--init-from", default=None,
                   help="codec stage: start from this checkpoint's compressor/control weights (e.g. a shipped run's ckpt)")
    t.add_argument("--output-dir", default=None, help="run folder (default: the config's output_dir)")

    x = sub.add_parser("export", help="a training run folder -> a model folder (the finished model, or a running stage's checkpoint)")
    x.add_argument("run", help="the run folder (a train --output-dir)")
    x.add_argument("-o", "--output", required=True, help="model folder to write (must not exist)")
    x.add_argument("--stage", type=int, default=None, help="export this stage's checkpoint (index; default: the latest running "
                   "codec, decoder or encoder stage's, else the finished model)")
    x.add_argument("--base", default=None, help="model folder the checkpoint's other parts come from (default: the run's init_from)")

    k = sub.add_parser("conformance", help="decode the shipped conformance vectors; check symbols, pixels and PSNR")
    k.add_argument("-m", "--model", default=None, help="only this shipped model's vectors")
    k.add_argument("--device", default="cpu", help="cpu or cuda (decode on a GPU)")
    k.add_argument("--fast", action="store_true", help=FAST_HELP)
    k.add_argument("--vectors", default=None, help="a folder laid out like osdiff/conformance_vectors (default: the shipped ones)")
    k.add_argument("--native-kernels", action="store_true", help="the CPU's own kernels, as decompress uses by default, instead of "
                   "the AVX2 pin (osdiff.kernels): pixels are then compared exactly only where they are the recorded ones")

    co = sub.add_parser("convert-official", help="the paper's released checkpoints (SD 2.1 + lambda_*.ckpt) -> an osdiff model folder")
    co.add_argument("--sd", required=True, help="v2-1_512-ema-pruned.ckpt (ldm single file) or a local SD 2.1 diffusers folder")
    co.add_argument("--ckpt", required=True, action="append", metavar="LAMBDA.ckpt",
                    help="an official lambda checkpoint; repeat for several quality levels (ordered by bpp)")
    co.add_argument("--config", default=None, help="official-format model config (default: the full-size configs/model/osdiff.yaml)")
    co.add_argument("-o", "--output", required=True, help="model folder to write")
    co.add_argument("--name", default="osdiff-official", help="model name written in every .osd file")
    co.add_argument("-f", "--force", action="store_true", help="overwrite an existing output folder")

    s = sub.add_parser("serve", help="local web page: osdiff vs AVIF/WebP/JPEG at the same file size")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("-m", "--model", default=None, help="shipped model name or model folder (default osdiff-tiny)")
    s.add_argument("--max-upload-mb", type=float, default=25.0, help="largest upload accepted (MiB)")
    s.add_argument("--max-pixels", type=float, default=4.0, help="largest image accepted (megapixels)")
    for command in (c, d, b, s):
        command.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    for command in (c, d, i, b, e, t, s):  # also accepted after the command; SUPPRESS keeps a global one
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def _version() -> str:
    from . import __version__

    return f"osdiff {__version__}"


# ---- helpers ----------------------------------------------------------------------------
def _expand(inputs: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    from .imageio import find_images

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = find_images(p, suffixes)
            if not found:
                raise OSDiffError(f"{p}: folder holds no {'/'.join(suffixes)} files")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise OSDiffError(f"{p}: no such file or folder")
    return files


def _outputs(files: list[Path], output: str | None, suffix: str, several: bool) -> list[Path]:
    """Output path for each input: beside it, into folder OUT, or exactly OUT (one input)."""
    if output is None:
        return [f.with_suffix(suffix) for f in files]
    out = Path(output)
    if several or out.is_dir() or output.endswith(("/", os.sep)):
        if out.exists() and not out.is_dir():
            raise OSDiffError(f"{out}: several inputs need an output folder, this is a file")
        return [out / f.with_suffix(suffix).name for f in files]
    return [out]


def _progress(items, enabled: bool, desc: str):
    """A bar over several files, on stderr and only when stderr is a terminal."""
    if not enabled:
        return items
    from .verbosity import progress

    return progress(items, desc=desc, unit="file")


def _load(model: str | None, fast: bool = False, verbose: bool = False, precision: str = "auto"):
    from .config import ComputeConfig
    from .hub import DEFAULT_MODEL, load

    codec = load(model or DEFAULT_MODEL, verbose=verbose)
    codec.compute = ComputeConfig(deterministic=not fast, precision=precision)
    return codec


def _run_each(files, outputs, work, desc: str) -> int:
    """Run `work(src, dst)` for every pair; report failures one line each; count them."""
    failures = 0
    several = len(files) > 1
    for src, dst in _progress(list(zip(files, outputs)), several, desc):
        try:
            work(src, dst)
        except OSDiffError as exc:
            failures += 1
            print(f"osdiff: error: {exc}", file=sys.stderr)
    return failures


def _split(command):
    """`command(args)` as one process of a job split with torchrun / accelerate launch
    (osdiff.distributed; a plain call otherwise): an error every rank agreed on is reported by
    rank 0 alone, the others exit non-zero quietly."""

    def run(args) -> int:
        from . import distributed as dist

        with dist.session():
            try:
                return command(args)
            except dist.JobFailed:
                if dist.is_main():
                    raise
                return EXIT_ERROR

    run.__doc__ = command.__doc__
    return run


def _run_shared(files: list[Path], outputs: list[Path], work, desc: str) -> list[dict]:
    """`work(src, dst) -> {"out": [lines], "err": [lines], ...}` for every pair, each process of
    a split job taking its share; rank 0 prints the lines in input order (as one process would)
    and gets the results of all pairs (the others get theirs). A pair's OSDiffError is one
    error line and {"failed": True}; any other error stops the whole job."""
    from . import distributed as dist

    def one(i: int) -> dict:
        try:
            return work(files[i], outputs[i])
        except OSDiffError as exc:
            return {"out": [], "err": [f"osdiff: error: {exc}"], "failed": True}

    mine = dist.shard(range(len(files)))
    longest = len(dist.shard(range(len(files)), 0))  # rank 0's share is the longest
    per_round = 1 if dist.world_size() == 1 else 4
    bar = None
    if len(files) > 1 and dist.is_main():
        from .verbosity import progress

        bar = progress(total=len(files), desc=desc, unit="file")
    results: list[dict] = []
    try:
        for start in range(0, longest, per_round):
            done, failure = [], None
            try:
                for i in mine[start:start + per_round]:
                    done.append((i, one(i)))
            except Exception as exc:  # what was done is reported first, then every rank stops
                failure = exc
            gathered = dist.gather(done)
            with dist.together():
                if gathered is None:  # not rank 0: keep quiet
                    results += [r for _, r in done]
                for _, result in sorted((r for part in gathered or [] for r in part), key=lambda r: r[0]):
                    for line in result["err"]:
                        print(line, file=sys.stderr, flush=True)
                    for line in result["out"]:
                        print(line, flush=True)
                    results.append(result)
                    if bar is not None:
                        bar.update(1)
                if failure is not None:
                    raise failure
    finally:
        if bar is not None:
            bar.close()
    return results


# ---- commands ---------------------------------------------------------------------------
@_split
def cmd_compress(args) -> int:
    from . import distributed as dist
    from .fileio import check_writable, write_bytes_atomic
    from .imageio import IMAGE_SUFFIXES

    with dist.together():
        files = _expand(args.inputs, IMAGE_SUFFIXES)
        outputs = _outputs(files, args.output, ".osd", len(files) > 1)
        twice = next((dst for dst, n in _counts(outputs).items() if n > 1), None)
        if twice is not None:
            raise OSDiffError(f"{twice}: two inputs would be written there (inputs with the same name into one folder)")
        for dst in outputs:
            check_writable(dst, args.force)
        target = _target(args)
        if args.strict and not target:
            raise OSDiffError("--strict goes with --bpp or --size")
        codec = _load(args.model, args.fast, args.verbose, args.precision)
        if "target_bytes" in target and target["target_bytes"] < codec.min_file_bytes():
            raise OSDiffError(f"--size {args.size} is below the smallest file this model can write ({codec.min_file_bytes()} bytes of header)")
        if not target:
            codec.check_quality(args.quality)

    def work(src: Path, dst: Path) -> dict:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = codec.encode(src, args.quality, strict=args.strict, **target)
            except OSDiffError as exc:  # a target this image cannot meet: say which image
                if not target or str(exc).startswith(str(src)):
                    raise
                raise OSDiffError(f"{src}: {exc}") from None
        err = [f"osdiff: warning: {src}: {w.message}" for w in caught if issubclass(w.category, OSDiffWarning)]
        try:
            write_bytes_atomic(dst, result.data, force=args.force)
        except OSDiffError as exc:
            return {"out": [], "err": [*err, f"osdiff: error: {exc}"], "failed": True}
        from .entropy.bitstream import parse

        header, _ = parse(result.data)
        bpp = len(result.data) * 8 / (header.width * header.height)
        line = f"{src} -> {dst}: {len(result.data)} bytes, {bpp:.4f} bpp, quality {header.quality}"
        over = result.target_bytes is not None and not result.fits
        if result.target_bytes is not None:
            line += f" (target {result.target_bytes} bytes, {result.encodes} encodes)"
        return {"out": [line], "err": err, "over": over}

    results = _run_shared(files, outputs, work, "compress")
    if not dist.is_main():
        return 0  # rank 0 reports the failures and exits non-zero for the job
    over = sum(r.get("over", False) for r in results)
    if over and len(files) > 1:
        print(f"osdiff: warning: {over} of {len(files)} images did not fit the target even at the lowest quality "
              f"(written at the lowest)", file=sys.stderr)
    return sum(r.get("failed", False) for r in results)


def _counts(paths: list[Path]) -> dict[Path, int]:
    counts: dict[Path, int] = {}
    for p in paths:
        key = Path(os.path.abspath(p))
        counts[key] = counts.get(key, 0) + 1
    return counts


def _target(args) -> dict:
    """--bpp / --size as the keyword arguments of `encode` (empty without a target)."""
    if args.size is not None:
        from .rate import parse_size

        return {"target_bytes": parse_size(args.size)}
    if args.bpp is not None:
        try:
            bpp = float(args.bpp)
        except ValueError:
            bpp = float("nan")
        if not (bpp > 0 and bpp != float("inf")):
            raise OSDiffError(f"--bpp must be a positive number of bits per pixel, got {args.bpp!r}")
        return {"target_bpp": bpp}
    return {}


def cmd_decompress(args) -> int:
    from .fileio import check_writable, write_atomic

    files = _expand(args.inputs, (".osd",))
    outputs = _outputs(files, args.output, ".png", len(files) > 1)
    for dst in outputs:
        check_writable(dst, args.force)
    if args.steps is not None and not 0 <= args.steps <= 1000:
        raise OSDiffError("--steps must be from 0 to 1000")
    if args.realism is not None and not 0.0 <= args.realism <= 1.0:
        raise OSDiffError(f"--realism must be from 0 to 1, got {args.realism}")
    codecs: dict[str, object] = {}

    def work(src: Path, dst: Path) -> None:
        from .entropy.bitstream import parse

        data = _read(src)
        header, _ = parse(data)
        key = args.model or header.model_name
        if key not in codecs:
            codecs[key] = _load(key, args.fast, args.verbose, args.precision)
            if args.realism is not None:
                if not hasattr(codecs[key], "realism_override"):
                    raise OSDiffError(f"--realism is a decoding option of osdiff's own models; {key} does not take it")
                codecs[key].realism_override = args.realism
        image = codecs[key].decompress(data, steps=args.steps)
        fmt = (dst.suffix.lstrip(".") or "png").upper()
        fmt = {"JPG": "JPEG", "TIF": "TIFF"}.get(fmt, fmt)

        def save(tmp: Path) -> None:
            try:
                image.save(tmp, format=fmt)
            except (KeyError, ValueError) as exc:
                raise OSDiffError(f"{dst}: cannot write images of type .{dst.suffix.lstrip('.')} ({exc})") from None

        write_atomic(dst, save, force=args.force)
        print(f"{src} -> {dst}: {header.width}x{header.height}")

    return _run_each(files, outputs, work, "decompress")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSDiffError(f"{path}: cannot read ({exc.strerror})") from None


def cmd_info(args) -> int:
    from .entropy.bitstream import parse

    failures = 0
    for item in _expand(args.inputs, (".osd",)):
        try:
            data = _read(item)
            header, strings = parse(data)
        except OSDiffError as exc:
            failures += 1
            print(f"osdiff: error: {exc}", file=sys.stderr)
            continue
        fields = {"file": str(item), "bytes": len(data), **header.as_dict(),
                  "bpp": round(len(data) * 8 / (header.width * header.height), 6),
                  "string_bytes": [len(s) for s in strings]}
        if args.json:
            print(json.dumps(fields))
        else:
            print("\n".join(f"{k:>14}: {v}" for k, v in fields.items()))
    return failures


def cmd_conformance(args) -> int:
    """One line per vector and a summary; a symbol mismatch or decode error fails (exit 1)."""
    from . import kernels

    if args.native_kernels or args.fast:
        kernels.unpin()  # OSDIFF_KERNELS=avx2 set it at import
    else:
        kernels.pin("avx2")  # before torch's first op
    import torch

    from .conformance import VECTOR_ROOT, check_vector, vector_files
    from .config import ComputeConfig
    from .hub import load

    root = Path(args.vectors) if args.vectors else VECTOR_ROOT
    files = vector_files(args.model, root)
    if not files:
        raise OSDiffError(f"no conformance vectors{' for ' + args.model if args.model else ''} in {root}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise OSDiffError("--device cuda: no GPU is visible to torch")
    failures, codecs = 0, {}
    for path in files:
        model = path.parent.parent.name
        if model not in codecs:
            codecs[model] = load(model, device=args.device, verbose=args.verbose)
            codecs[model].compute = ComputeConfig(deterministic=not args.fast)  # decoded in float32 (check_vector)
        result = check_vector(codecs[model], path)
        failures += not result.passed
        print(result.line(), flush=True)
    where = f"CPU kernels {kernels.state()}" if args.device == "cpu" else args.device
    print(f"conformance: {len(files)} vectors, {len(files) - failures} pass, {failures} fail ({where})")
    return failures


def cmd_train(args) -> int:
    from .training.config import load_config
    from .training.trainer import Trainer

    config_path = Path(args.config)
    overrides = {"device": args.device, "init_from": args.init_from, "output_dir": args.output_dir}
    config = load_config(config_path, **{k: v for k, v in overrides.items() if v is not None})
    trainer = Trainer(config, config_dir=Path.cwd())
    model = trainer.run(max_steps=args.max_steps, max_minutes=args.max_minutes)
    stopped_by = trainer.context.stopped_by  # SIGINT / SIGTERM: stopped after a step, checkpointed
    if stopped_by:
        trainer.context.print(f"stopped by {stopped_by}, with a checkpoint; run the same command again to resume")
        return 128 + int(getattr(signal.Signals, stopped_by, signal.SIGTERM))
    trainer.context.print(f"finished: {model}" if model else "stopped early; run the same command again to resume")
    return 0


def cmd_export(args) -> int:
    from .training.export import export_run

    output, step = export_run(args.run, args.output, base=args.base, stage=args.stage)
    print(f"wrote {output}" + (f" (step {step})" if step is not None else " (the finished model)"))
    return 0


def cmd_convert_official(args) -> int:
    from .convert.official import convert_official

    report = convert_official(args.sd, args.ckpt, args.output, config=args.config, name=args.name, force=args.force)
    for path, keys in report.unused.items():
        if keys:
            groups = sorted({".".join(k.split(".")[:3]) for k in keys})
            shown = ", ".join(groups[:6]) + (", ..." if len(groups) > 6 else "")
            print(f"{path}: {len(keys)} keys not used ({shown})")
    for level, (path, bpp) in enumerate(zip(report.levels, report.bpp), 1):
        print(f"quality {level}: {path} ({bpp:.4f} bpp on the probe image)")
    print(f"wrote {args.output}")
    return 0


def cmd_serve(args) -> int:
    import socket

    import uvicorn

    from .config import ServeLimits
    from .serve import create_app

    if not 1 <= args.port <= 65535 or args.max_upload_mb <= 0 or args.max_pixels <= 0:
        raise OSDiffError("--port must be 1..65535 and the limits positive")
    try:  # a clear one-line error for a busy port or a bad address, before loading the model
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as exc:
        raise OSDiffError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    limits = ServeLimits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_pixels * 1e6))
    pipe = _load(args.model, verbose=args.verbose, precision=args.precision)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"osdiff: warning: listening on {args.host}: other machines can reach this page", file=sys.stderr)
    print(f"osdiff serve: http://{args.host}:{args.port}/ (model {pipe.config.model_name}; Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(pipe, limits), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .benchmark import benchmark, format_table
    from .config import ComputeConfig

    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
        steps = sorted({int(v) for v in args.steps.split(",")})
    except ValueError:
        raise OSDiffError(f"--size must be HEIGHTxWIDTH and --steps comma-separated integers, got {args.size!r} / {args.steps!r}") from None
    if height < 1 or width < 1 or min(steps) < 1 or args.repeat < 1 or args.warmup < 0:
        raise OSDiffError("--size, --steps and --repeat must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise OSDiffError("--device cuda: no CUDA device is available")
    if args.json:
        from .fileio import check_writable

        check_writable(Path(args.json), force=True)
    if args.model == "sd21-arch":
        from .build import build_sd21_architecture

        codec, random_weights = build_sd21_architecture(), True
        codec.compressor.update(force=True)
        codec.compute = ComputeConfig(deterministic=not args.fast, precision=args.precision)
    elif args.model == "official-arch":
        from .convert.official import build_official_architecture

        codec, random_weights = build_official_architecture(), True
        codec.compute = ComputeConfig(deterministic=not args.fast, precision=args.precision)
    else:
        codec, random_weights = _load(args.model, args.fast, args.verbose, args.precision), False
    result = benchmark(codec, (height, width), steps, args.device, args.dtype, args.repeat, args.warmup,
                       model_label=args.model, random_weights=random_weights)
    print(format_table(result))
    if args.json:
        from .fileio import write_bytes_atomic

        write_bytes_atomic(Path(args.json), json.dumps(result.to_json(), indent=2).encode(), force=True)
    return 0


@_split
def cmd_eval(args) -> int:
    from . import distributed as dist
    from .evaluation.codecs import make_codec, parse_qualities, with_qualities
    from .evaluation.metrics import MetricSuite
    from .evaluation.runner import evaluate

    with dist.together():
        names = [c.strip() for c in args.codecs.split(",") if c.strip()]
        if not names:
            raise OSDiffError("--codecs is empty")
        qualities = parse_qualities(args.qualities) if args.qualities is not None else None
        codecs = [make_codec(n, args.model if n.startswith("osdiff") else None, verbose=args.verbose) for n in names]
        if qualities is not None:
            codecs = [with_qualities(c, qualities) for c in codecs]
            if not any(c.continuous for c in codecs):
                raise OSDiffError("--qualities: none of the codecs has gain vectors (continuous quality)")
        only = None if args.metrics is None else frozenset(m.strip() for m in args.metrics.split(",") if m.strip())
        if only is not None and args.lpips_net == "vgg" and "lpips" in only:
            only = (only - {"lpips"}) | {"lpips_vgg"}
        metrics = MetricSuite(args.lpips_net, only)
    summary = evaluate([Path(d) for d in args.data_dir], codecs, Path(args.out), metrics, limit=args.limit,
                       anchor=args.anchor, crops=not args.no_crops, crop_bpp=args.crop_bpp, reference=args.reference)
    if summary is None:  # not rank 0 of a split job: rank 0 reports
        return 0
    from .evaluation.tables import bd_against_each, bd_table, headline_table, published_table, versus_table

    print(headline_table(summary))
    print()
    from .evaluation.metrics import rd_metrics

    print(bd_table(summary, rd_metrics(summary["metrics"])))
    if summary.get("published"):
        print()
        print(published_table(summary))
    for codec in (c for c in codecs if c.learned):
        print()
        measured = [m for m in ("dists", "lpips", "psnr") if m in summary["metrics"]]
        if measured:
            print(versus_table(summary, codec.name, [c.name for c in codecs if not c.learned], measured[0]))
        print()
        print(bd_against_each(summary, codec.name, rd_metrics(summary["metrics"])))
    print(f"\nreport: {Path(args.out) / 'report.html'}")
    return 0


COMMANDS = {"conformance": cmd_conformance, "convert-official": cmd_convert_official, "eval": cmd_eval, "export": cmd_export, "bench": cmd_bench, "compress": cmd_compress, "decompress": cmd_decompress, "info": cmd_info, "train": cmd_train, "serve": cmd_serve}


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args)
    finally:  # a caller that runs main() in-process gets its own SIGTERM handling back
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """One command, its errors turned into one line and an exit status."""
    try:
        if args.command != "info":
            _quiet_libraries(args.verbose)
        failures = COMMANDS[args.command](args)
    except OSDiffError as exc:
        print(f"osdiff: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("osdiff: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`osdiff info f.osd | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except Exception as exc:  # a bug, not bad input: still one line unless asked for more
        if os.environ.get("OSDIFF_DEBUG"):
            raise
        print(f"osdiff: internal error: {exc.__class__.__name__}: {exc} (set OSDIFF_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_ERROR if failures else 0


def _quiet_libraries(verbose: bool = False) -> None:
    """The command line owns its process: library chatter stays off for the whole command
    (training and evaluation load networks outside `osdiff.load` too), unless --verbose."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if verbose:
        return
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
