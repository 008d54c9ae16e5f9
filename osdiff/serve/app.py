"""The FastAPI app of `osdiff serve`: the page (static files shipped in the package) and a
JSON API. Uploads are raw request bodies read into memory (never written to disk), checked
against `ServeLimits` before decoding; every failure is a JSON `{"error": "..."}`.

  GET  /api/info                         model, compute precision, quality levels, limits
  POST /api/compress?quality=Q           body: image file  -> osdiff result (+ .osd, decoded PNG)
  POST /api/decompress                   body: .osd file   -> decoded PNG
  POST /api/compare?quality=Q[&progress=1][&codecs=avif,webp,jpeg]
                                         body: image file  -> osdiff + size-matched classical codecs
  POST /api/compare?match=CODEC&setting=S[&progress=1][&codecs=...]
                                         body: image file  -> CODEC at setting S, osdiff coded to that
                                         file's size (target size), the other codecs to osdiff's

Q is a real number from 1 to the highest level for a model with gain vectors, else an integer.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import warnings
from importlib import resources
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..config import ServeLimits
from ..entropy.bitstream import QUALITY_STEPS
from ..errors import InputTooLarge, OSDiffError, OSDiffWarning
from ..evaluation.codecs import Codec, classical_codec, learned_codec
from ..imageio import image_from_bytes, to_tensor
from ..codec_pipeline import ImageCodecPipeline
from .comparison import CodedImage, encode_timed, match_file_size, served_metrics

STATIC = resources.files("osdiff.serve") / "static"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(pipe: ImageCodecPipeline, limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The web app around one loaded codec. Model work runs one request at a time."""
    app = FastAPI(title="osdiff", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    learned = learned_codec(pipe.config.model_name, pipe)
    metrics = served_metrics()
    classical: dict[str, Codec] = {}
    for name in limits.compare_codecs:
        try:
            classical[name] = classical_codec(name)
        except OSDiffError:  # e.g. a Pillow without AVIF: the page shows the others
            pass

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(OSDiffError)
    async def osdiff_error(request: Request, exc: OSDiffError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413 if isinstance(exc, InputTooLarge) else 400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({exc.__class__.__name__}: {exc})"}, status_code=500)

    # ---- helpers -------------------------------------------------------------------------
    async def read_upload(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes:
            raise ApiError(413, f"upload of {int(declared)} bytes is over the limit of {limits.max_upload_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_upload_bytes:
                raise ApiError(413, f"upload is over the limit of {limits.max_upload_bytes} bytes")
            chunks.append(chunk)
        if size == 0:
            raise ApiError(400, "empty upload: send the file as the request body")
        return b"".join(chunks)

    def quality_of(request: Request) -> int | float:
        """The quality as the file will store it (1/256 steps; whole levels without gains)."""
        raw = request.query_params.get("quality", str(pipe.config.default_quality))
        try:
            number = float(raw)
        except ValueError:
            number = raw  # not a number: check_quality refuses it with its one message
        try:
            return pipe.check_quality(number)
        except OSDiffError as exc:
            raise ApiError(400, str(exc)) from None

    def match_of(request: Request) -> tuple[str, int] | None:
        """`match=CODEC&setting=S`: code osdiff to the size of CODEC's file at setting S."""
        name = request.query_params.get("match")
        if name is None:
            return None
        if "quality" in request.query_params:
            raise ApiError(400, "give a quality or match=CODEC&setting=S, not both")
        if name not in classical:
            raise ApiError(400, f"match: unknown or unavailable codec {name!r}; available: {list(classical)}")
        raw = request.query_params.get("setting", "")
        lo, hi = classical[name].quality_range
        if not raw.isdigit() or not lo <= int(raw) <= hi:
            raise ApiError(400, f"setting of {name} must be an integer from {lo} to {hi}, got {raw!r}")
        return name, int(raw)

    def open_upload(data: bytes):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = image_from_bytes(data, limits.max_pixels)
        return image, sorted({str(w.message) for w in caught})

    def locked(fn: Callable, *args):
        with lock:
            return fn(*args)

    def osdiff_result(image, original, quality: int | float | None = None, target_bytes: int | None = None) -> tuple[CodedImage, dict]:
        """osdiff at `quality`, or at the highest quality that fits `target_bytes`. `original`:
        `image` as a tensor, the reference for the metrics."""
        if target_bytes is None:
            coded = encode_timed(learned, image, quality)
            return coded, {**coded.summary(original, metrics), "png": _png_b64(coded.decoded), "encodes": 1, "fits": True}
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # a target below the lowest quality: `fits` says so
            warnings.simplefilter("ignore", OSDiffWarning)
            result = pipe.encode(image, target_bytes=max(target_bytes, pipe.min_file_bytes()))
        t1 = time.perf_counter()
        decoded = pipe.decompress(result.data)
        coded = CodedImage(learned, result.quality, result.data, decoded, t1 - t0, time.perf_counter() - t1)
        return coded, {**coded.summary(original, metrics), "png": _png_b64(decoded), "encodes": result.encodes,
                       "fits": result.fits and len(result.data) <= target_bytes}

    # ---- routes ---------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/api/info")
    async def info() -> dict:
        return {
            "model": pipe.config.model_name, "model_hash": pipe.model_hash.hex(),
            "precision": pipe.network_precision,  # what the autoencoder and UNet compute in
            "quality_levels": pipe.num_quality_levels, "default_quality": pipe.config.default_quality,
            "continuous_quality": pipe.continuous_quality, "quality_step": 1 / QUALITY_STEPS if pipe.continuous_quality else 1,
            "max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels,
            "metrics_unavailable": metrics.unavailable,
            "compare_codecs": list(classical),
            "compare_settings": {name: {"min": c.quality_range[0], "max": c.quality_range[1], "default": c.settings[len(c.settings) // 2]}
                                 for name, c in classical.items()},
        }

    @app.post("/api/compress")
    async def compress(request: Request) -> dict:
        quality = quality_of(request)
        image, notes = open_upload(await read_upload(request))

        def work() -> dict:
            _, result = osdiff_result(image, to_tensor(image), quality)
            return {"width": image.width, "height": image.height, "quality": quality, "warnings": notes, **result}

        return await run_in_threadpool(locked, work)

    @app.post("/api/decompress")
    async def decompress(request: Request) -> dict:
        data = await read_upload(request)

        def work() -> dict:
            header, _ = pipe.read_header(data)
            if header.width * header.height > limits.max_pixels:
                raise InputTooLarge(f".osd file of {header.width}x{header.height} pixels is over the limit of {limits.max_pixels} pixels")
            t0 = time.perf_counter()
            image = pipe.decompress(data)
            return {"width": header.width, "height": header.height, "quality": header.quality, "model": header.model_name,
                    "bytes": len(data), "bpp": len(data) * 8 / (header.width * header.height),
                    "decode_s": time.perf_counter() - t0, "png": _png_b64(image)}

        return await run_in_threadpool(locked, work)

    @app.post("/api/compare")
    async def compare(request: Request):
        match = match_of(request)
        quality = None if match else quality_of(request)
        names = request.query_params.get("codecs")
        chosen = list(classical) if names is None else [n for n in names.split(",") if n]
        unknown = [n for n in chosen if n not in classical]
        if unknown:
            raise ApiError(400, f"unknown or unavailable codecs {unknown}; available: {list(classical)}")
        if match and match[0] not in chosen:
            chosen.insert(0, match[0])
        image, notes = open_upload(await read_upload(request))

        def work(emit: Callable[[dict], None]) -> dict:
            total = 1 + len(chosen)
            original = to_tensor(image)
            reference = None
            if match:
                name, setting = match
                emit({"progress": 0, "total": total, "stage": f"{name} at setting {setting}"})
                reference = encode_timed(classical[name], image, setting)
                emit({"progress": 1, "total": total, "stage": f"osdiff to {len(reference.data)} bytes"})
                coded, first = osdiff_result(image, original, target_bytes=len(reference.data))
                if not first["fits"]:
                    notes.append(f"osdiff's lowest quality gives {len(coded.data)} bytes, more than {name}'s "
                                 f"{len(reference.data)} bytes at setting {setting}")
            else:
                emit({"progress": 0, "total": total, "stage": f"osdiff quality {quality}"})
                coded, first = osdiff_result(image, original, quality)
            results, done = [first], 1 + (match is not None)
            for name in chosen:
                if reference is not None and name == match[0]:
                    results.append(reference.summary(original, metrics))
                    continue
                emit({"progress": done, "total": total, "stage": f"{name} at {len(coded.data)} bytes"})
                results.append(match_file_size(classical[name], image, len(coded.data)).summary(original, metrics))
                done += 1
            answer = {"width": image.width, "height": image.height, "quality": coded.setting, "warnings": notes,
                      "original_png": _png_b64(image), "results": results}
            if match:
                answer["match"] = {"codec": match[0], "setting": match[1], "bytes": len(reference.data)}
            return answer

        if request.query_params.get("progress") != "1":
            return await run_in_threadpool(locked, work, lambda event: None)
        return StreamingResponse(_progress_stream(lambda emit: locked(work, emit)), media_type="application/x-ndjson")

    return app


async def _progress_stream(work: Callable[[Callable[[dict], None]], dict]):
    """Run `work(emit)` in a thread; yield its events, then `{"result": ...}` or `{"error": ...}`,
    one JSON object per line. The thread finishes (and frees the model) even if the client leaves."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(event: dict) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    def run() -> None:
        try:
            emit({"result": work(emit)})
        except OSDiffError as exc:
            emit({"error": str(exc)})
        except Exception as exc:  # reported in the page; the server keeps running
            emit({"error": f"internal error ({exc.__class__.__name__}: {exc})"})

    loop.run_in_executor(None, run)
    while True:
        event = await queue.get()
        yield json.dumps(event) + "\n"
        if "result" in event or "error" in event:
            return


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
