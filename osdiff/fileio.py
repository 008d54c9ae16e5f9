"""Safe output files: written to a temporary file beside the target, then renamed into place,
so a crash or kill never leaves a partial file and an existing file is never replaced unless
`force` is set."""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

from .errors import OSDiffError


def check_writable(path: Path, force: bool) -> None:
    """Fail early, before any work, if `path` exists and may not be replaced."""
    if path.exists() and not force:
        raise OSDiffError(f"{path}: already exists (use --force to overwrite)")
    if path.is_dir():
        raise OSDiffError(f"{path}: is a directory")


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends (main thread only), so an interrupt cannot land
    between creating the temporary file and remembering it, or between linking the output into
    place and removing the temporary file."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def write_atomic(path: Path, write: Callable[[Path], None], force: bool = False) -> None:
    """Call `write(tmp_path)` then move the result to `path` in one step."""
    path = Path(path)
    check_writable(path, force)
    tmp: Path | None = None
    try:
        with _signals_deferred():  # a signal held here fires at the end of this block, inside the try
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as exc:
                raise OSDiffError(f"{path}: cannot write ({exc.strerror})") from None
            os.close(fd)
            tmp = Path(tmp_name)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        with _signals_deferred():
            _commit(tmp, path, force)
    except OSError as exc:
        raise OSDiffError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            with _signals_deferred(), contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _commit(tmp: Path, path: Path, force: bool) -> None:
    """Move the finished temporary file to `path` in one step; never overwrite unless `force`."""
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if `path` appeared meanwhile: never overwrite
    except FileExistsError:
        raise OSDiffError(f"{path}: already exists (use --force to overwrite)") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise OSDiffError(f"{path}: already exists (use --force to overwrite)") from None
        os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes, force: bool = False) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data), force=force)
