"""A quiet first run: loading a model and `osdiff compress` write nothing to stderr, the
libraries' settings are put back, and --verbose / verbose=True show their output."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from osdiff.cli import main
from osdiff.verbosity import library_output, progress

LOADING = "Loading pipeline components"


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_loading_shipped_models_writes_nothing_to_stderr_and_verbose_shows_it():
    script = textwrap.dedent(
        """
        import sys
        import osdiff
        osdiff.load("osdiff-tiny")
        osdiff.load("hific-tiny")
        sys.stderr.write("<verbose>"); sys.stderr.flush()
        osdiff.load("hific-tiny", verbose=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    quiet, _, verbose = proc.stderr.partition("<verbose>")
    assert quiet == "" and proc.stdout == ""
    assert LOADING in verbose


def test_compress_one_image_writes_nothing_to_stderr(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.png")
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "osdiff.cli", "compress", str(tmp_path / "a.png")],
                              stdout=subprocess.PIPE, stderr=f, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0
    assert err.read_text() == ""
    assert "a.osd" in proc.stdout and (tmp_path / "a.osd").stat().st_size > 0


@pytest.fixture
def library_defaults():
    """diffusers/transformers at their defaults (WARNING, bars on) for the test, then as before."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    libs = {"diffusers": dlog, "transformers": tlog}
    before = {name: (logging.getLogger(name).level, lib.is_progress_bar_enabled()) for name, lib in libs.items()}
    for lib in libs.values():
        lib.set_verbosity_warning()
        lib.enable_progress_bar()
    yield dlog, tlog
    for name, (level, bar) in before.items():
        logging.getLogger(name).setLevel(level)
        (libs[name].enable_progress_bar if bar else libs[name].disable_progress_bar)()


def test_load_restores_the_callers_library_settings(library_defaults, capfd):
    import huggingface_hub.utils as hub_utils

    import osdiff

    dlog, tlog = library_defaults
    dlog.set_verbosity_info()
    tlog.set_verbosity_debug()
    tlog.disable_progress_bar()
    dlog.enable_progress_bar()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    osdiff.load("hific-tiny")
    assert capfd.readouterr().err == ""
    assert logging.getLogger("diffusers").level == logging.INFO
    assert logging.getLogger("transformers").level == logging.DEBUG
    assert dlog.is_progress_bar_enabled() and not tlog.is_progress_bar_enabled()
    assert hub_utils.are_progress_bars_disabled() == hub_bars_off

    with pytest.raises(RuntimeError), library_output():  # restored when the block fails too
        assert logging.getLogger("diffusers").level == logging.ERROR and not dlog.is_progress_bar_enabled()
        raise RuntimeError
    assert logging.getLogger("diffusers").level == logging.INFO and dlog.is_progress_bar_enabled()


def test_cli_verbose_shows_library_output(library_defaults, tmp_path, photo, capfd):
    Image.fromarray(photo).save(tmp_path / "a.png")
    assert main(["--verbose", "compress", str(tmp_path / "a.png"), "-m", "hific-tiny"]) == 0
    assert LOADING in capfd.readouterr().err
    assert main(["compress", str(tmp_path / "a.png"), "-m", "hific-tiny", "-f", "-v"]) == 0  # after the command too
    assert LOADING in capfd.readouterr().err


def test_progress_bars_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, hidden in ((io.StringIO(), True), (Terminal(), False)):
        saved, sys.stderr = sys.stderr, stream
        try:
            bar = progress(range(3), desc="files")
            assert bool(bar.disable) is hidden  # (tqdm sets it when the bar closes)
            assert list(bar) == [0, 1, 2]
            assert (stream.getvalue() == "") is hidden
        finally:
            sys.stderr = saved
    assert progress(range(3), disable=True).disable
