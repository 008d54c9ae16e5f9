"""Stopping a training run cleanly: the first SIGINT or SIGTERM asks the loop to stop after the
step it is in, with a checkpoint (a step of a large model can take a minute; killing it mid-way
would lose everything since the last periodic checkpoint); a second one interrupts at once."""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first stop signal (`is_set()`); its name in `signal_name`."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def is_set(self) -> bool:
        return self.signal_name is not None


@contextmanager
def stop_after_step(message: str = "stopping after this step, with a checkpoint (again to stop now)") -> Iterator[StopRequest]:
    """Within the block, SIGINT / SIGTERM set the yielded StopRequest (and print `message` once);
    a second signal raises KeyboardInterrupt. The caller's handlers come back on exit. Outside
    the main thread (where Python cannot set handlers) the request is never set."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.is_set():
            raise KeyboardInterrupt
        request.signal_name = signal.Signals(signum).name
        print(f"{request.signal_name}: {message}", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


__all__ = ["StopRequest", "stop_after_step"]
