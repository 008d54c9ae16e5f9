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


class _InterruptsHeld:
    """While active (main thread only), SIGINT/SIGTERM are held: one that comes is recorded and
    handed, when the block ends, to the handler it would have met. `allowed()` lets them
    through for a stretch (a long write stays interruptible).

    Python-level handlers, not a signal mask: the kernel may deliver a process signal to any
    thread (torch keeps worker threads), and Python then runs the handler in the main thread
    whatever that thread's mask says."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}  # the handlers replaced; empty when not active
        self.held: list[int] = []

    def _hold(self, signum: int, frame) -> None:
        self.held.append(signum)

    def __enter__(self) -> "_InterruptsHeld":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not None:  # None: a handler from C, which Python cannot put back
                    self.previous[signum] = signal.signal(signum, self._hold)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
        self._deliver()

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _deliver(self) -> None:
        """Act on a held signal as its handler (a callable, SIG_DFL or SIG_IGN) would have."""
        if not self.held:
            return
        signum = self.held.pop(0)
        self.held.clear()
        handler = self.previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)

    @contextlib.contextmanager
    def allowed(self):
        try:
            self._restore()
            self._deliver()  # one held so far acts now
            yield
        finally:
            for signum in self.previous:
                signal.signal(signum, self._hold)


def write_atomic(path: Path, write: Callable[[Path], None], force: bool = False) -> None:
    """Call `write(tmp_path)` then move the result to `path` in one step.

    Interrupts are held everywhere except inside `write`, so one cannot land between creating
    the temporary file and remembering it, or before it is removed; an interrupt held meanwhile
    fires when everything is cleaned up."""
    path = Path(path)
    check_writable(path, force)
    tmp: Path | None = None
    with _InterruptsHeld() as interrupts:
        try:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as exc:
                raise OSDiffError(f"{path}: cannot write ({exc.strerror})") from None
            os.close(fd)
            tmp = Path(tmp_name)
            with interrupts.allowed():
                write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            _commit(tmp, path, force)
        except OSError as exc:
            raise OSDiffError(f"{path}: cannot write ({exc.strerror or exc})") from None
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
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
