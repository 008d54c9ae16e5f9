"""Safe output files: written to a temporary file beside the target, then renamed into place,
so a crash or kill never leaves a partial file and an existing file is never replaced unless
`force` is set."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import OSDiffError


def check_writable(path: Path, force: bool) -> None:
    """Fail early, before any work, if `path` exists and may not be replaced."""
    if path.exists() and not force:
        raise OSDiffError(f"{path}: already exists (use --force to overwrite)")
    if path.is_dir():
        raise OSDiffError(f"{path}: is a directory")


def write_atomic(path: Path, write: Callable[[Path], None], force: bool = False) -> None:
    """Call `write(tmp_path)` then move the result to `path` in one step."""
    path = Path(path)
    check_writable(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OSDiffError(f"{path}: cannot write ({exc.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if `path` appeared meanwhile: never overwrite
            except FileExistsError:
                raise OSDiffError(f"{path}: already exists (use --force to overwrite)") from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise OSDiffError(f"{path}: already exists (use --force to overwrite)") from None
                os.replace(tmp, path)
    except OSError as exc:
        raise OSDiffError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(path: Path, data: bytes, force: bool = False) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data), force=force)
