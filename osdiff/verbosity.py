"""What osdiff lets other libraries print, and its own progress bars.

`library_output(verbose=False)` silences diffusers' and transformers' progress bars, log
messages and Python warnings for the duration of a block (loading a model) and then puts
the caller's settings back, so `osdiff.load` is quiet without changing them for good.
`progress(...)` is tqdm on stderr, shown only when stderr is a terminal.
"""
from __future__ import annotations

import importlib
import logging
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

LIBRARIES = ("diffusers", "transformers")


@contextmanager
def library_output(verbose: bool = False) -> Iterator[None]:
    """Quiet block: no progress bars, log messages below ERROR or warnings from the libraries
    (unless `verbose`); their logging levels and progress-bar switches are restored after."""
    if verbose:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = []
        for name in LIBRARIES:
            try:
                lib_logging = importlib.import_module(f"{name}.utils.logging")
            except ImportError:
                continue
            lib_logging.get_verbosity()  # makes the library configure its root logger first
            logger = logging.getLogger(name)
            saved.append((lib_logging, logger, logger.level, lib_logging.is_progress_bar_enabled()))
        hub_bars = _hub_progress_states()
        hub_saved = dict(hub_bars) if hub_bars is not None else None
        try:
            for lib_logging, logger, _, _ in saved:
                logger.setLevel(logging.ERROR)
                lib_logging.disable_progress_bar()
            yield
        finally:
            for lib_logging, logger, level, bar in saved:
                logger.setLevel(level)
                (lib_logging.enable_progress_bar if bar else lib_logging.disable_progress_bar)()
            if hub_bars is not None:  # the libraries switch huggingface_hub's bars too
                hub_bars.clear()
                hub_bars.update(hub_saved)


def _hub_progress_states() -> dict | None:
    """huggingface_hub's progress-bar switches (a dict it keeps per group), if it has them."""
    try:
        states = importlib.import_module("huggingface_hub.utils.tqdm").progress_bar_states
    except (ImportError, AttributeError):
        return None
    return states if isinstance(states, dict) else None


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress(iterable=None, **kwargs):
    """A tqdm bar on stderr, hidden when stderr is not a terminal (a log file, a pipe)."""
    from tqdm import tqdm

    kwargs.setdefault("file", sys.stderr)
    kwargs["disable"] = kwargs.get("disable", False) or not stderr_is_terminal()
    return tqdm(iterable, **kwargs)
