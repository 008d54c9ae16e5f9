"""CLI behaviour: outputs, --force, atomic writes, one-line errors with non-zero exit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osdiff.cli import main


@pytest.fixture
def images(tmp_path, photo) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photo).save(folder / "a.png")
    Image.fromarray(photo[::-1]).save(folder / "b.jpg", quality=95)
    return folder


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_compress_decompress_info(images, tmp_path, capsys, tiny_codec_folder):
    m = str(tiny_codec_folder)
    assert main(["compress", str(images / "a.png"), "-o", str(tmp_path / "a.osd"), "-q", "3", "-m", m]) == 0
    assert "bpp" in capsys.readouterr().out
    assert main(["decompress", str(tmp_path / "a.osd"), "-m", m]) == 0
    out = Image.open(tmp_path / "a.png")
    assert out.size == (56, 40) and out.mode == "RGB"
    assert main(["info", str(tmp_path / "a.osd"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["quality"] == 3 and info["width"] == 56 and info["model_name"] == "tiny-test"
    assert info["bytes"] == (tmp_path / "a.osd").stat().st_size


def test_decompress_uses_model_named_in_file(tmp_path, images):
    assert main(["compress", str(images / "a.png"), "-o", str(tmp_path / "x.osd")]) == 0
    assert main(["decompress", str(tmp_path / "x.osd")]) == 0
    assert (tmp_path / "x.png").is_file()


def test_folder_input_and_output_folder(images, tmp_path, tiny_codec_folder):
    out = tmp_path / "coded"
    assert main(["compress", str(images), "-o", str(out), "-m", str(tiny_codec_folder)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.osd", "b.osd"]
    assert main(["decompress", str(out), "-o", str(tmp_path / "dec"), "-m", str(tiny_codec_folder)]) == 0
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["a.png", "b.png"]


def test_no_overwrite_without_force(images, tmp_path, capsys, tiny_codec_folder):
    target = tmp_path / "keep.osd"
    target.write_bytes(b"precious")
    args = ["compress", str(images / "a.png"), "-o", str(target), "-m", str(tiny_codec_folder)]
    assert main(args) == 1
    assert target.read_bytes() == b"precious"
    assert "already exists" in _err_lines(capsys)[-1]
    assert main(args + ["--force"]) == 0
    assert target.read_bytes()[:4] == b"\x89OSD"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("argv, message", [
    (["compress", "missing.png"], "no such file"),
    (["compress", "{notimg}"], "not a readable image"),
    (["compress", "{img}", "-q", "0"], "quality must be"),
    (["compress", "{img}", "-q", "abc"], "invalid float value"),
    (["compress", "{img}", "-q", "nan"], "quality must be"),
    (["compress", "{img}", "-q", "5.5"], "quality must be"),
    (["compress", "{img}", "--size", "abc"], "size must be"),
    (["compress", "{img}", "--size", "0"], "size must be"),
    (["compress", "{img}", "--size=-5kB"], "size must be"),
    (["compress", "{img}", "--size", "10"], "below the smallest file"),
    (["compress", "{img}", "--bpp", "0"], "--bpp must be"),
    (["compress", "{img}", "--bpp", "-0.1"], "--bpp must be"),
    (["compress", "{img}", "--bpp", "abc"], "--bpp must be"),
    (["compress", "{img}", "--bpp", "0.0001"], "below the smallest file"),
    (["compress", "{img}", "-q", "2", "--size", "2kB"], "not allowed with"),
    (["compress", "{img}", "--strict"], "--strict goes with"),
    (["compress", "{img}", "-m", "no-such-model"], "no model"),
    (["decompress", "{notimg}"], "wrong magic"),
    (["decompress", "{corrupt}"], "CRC32"),
    (["info", "{corrupt}"], "CRC32"),
    (["decompress", "{good}", "--steps", "-1"], "--steps"),
    (["decompress", "{good}", "--steps", "1001"], "--steps"),
    (["decompress", "{good}", "--realism", "1.5"], "--realism"),
    (["decompress", "{good}", "--realism", "abc"], "invalid float value"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_one_line_error_no_output(argv, message, images, tmp_path, capsys, monkeypatch, tiny_codec_folder):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.png").write_text("not an image")
    (tmp_path / "text.osd").write_text("not an osd file")
    main(["compress", str(images / "a.png"), "-o", str(tmp_path / "good.osd"), "-m", str(tiny_codec_folder)])
    good = (tmp_path / "good.osd").read_bytes()
    (tmp_path / "corrupt.osd").write_bytes(good[:20] + bytes([good[20] ^ 1]) + good[21:])
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    subs = {"{img}": str(images / "a.png"), "{notimg}": "junk.png" if argv[0] == "compress" else "text.osd",
            "{corrupt}": "corrupt.osd", "{good}": "good.osd"}
    argv = [subs.get(a, a) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    assert code != 0
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("osdiff: error:") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_partial_failure_still_processes_the_rest(images, tmp_path, capsys, tiny_codec_folder):
    (images / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    assert main(["compress", str(images), "-o", str(out), "-m", str(tiny_codec_folder)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.osd", "b.osd"]
    assert any("zz_broken.png" in line for line in _err_lines(capsys))


def test_real_entry_point_no_traceback(tmp_path):
    bad = tmp_path / "bad.osd"
    bad.write_bytes(b"\x89OSD" + os.urandom(50))
    proc = subprocess.run([sys.executable, "-m", "osdiff.cli", "decompress", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("osdiff: error:") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.png").exists()


def test_failed_write_leaves_nothing(tmp_path):
    from osdiff.errors import OSDiffError
    from osdiff.fileio import write_atomic

    def explode(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSDiffError("boom")

    with pytest.raises(OSDiffError):
        write_atomic(tmp_path / "out.bin", explode)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt, as in an interactive shell: a suite started in the
    background of a non-interactive shell inherits SIGINT ignored."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupt_via_other_thread() -> None:
    """Send SIGINT the way the kernel may deliver a process signal: to a thread other than the
    main one (torch keeps worker threads); Python then runs the handler in the main thread."""
    import signal
    import threading
    import time

    stop = threading.Event()
    # a daemon, released in `finally`: the handler may raise right after pthread_kill, before
    # stop.set(), and a waiting non-daemon thread then keeps the interpreter from exiting (CI hung)
    worker = threading.Thread(target=stop.wait, daemon=True)
    worker.start()
    try:
        signal.pthread_kill(worker.ident, signal.SIGINT)
        time.sleep(0.05)  # the main thread's handler runs at its next check, here
    finally:
        stop.set()


def test_interrupt_while_committing_is_held_until_cleaned_up(tmp_path, monkeypatch, sigint_raises):
    """An interrupt that comes after the image is written waits until the output is in place and
    the temporary file removed, then stops the program."""
    from osdiff import fileio

    commit = fileio._commit

    def commit_interrupted(tmp, path, force):
        _interrupt_via_other_thread()
        commit(tmp, path, force)

    monkeypatch.setattr(fileio, "_commit", commit_interrupted)
    with pytest.raises(KeyboardInterrupt):
        fileio.write_bytes_atomic(tmp_path / "out.bin", b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"whole"


def test_interrupt_while_writing_stops_and_leaves_nothing(tmp_path, sigint_raises):
    """A long write stays interruptible, and what it wrote so far is removed."""
    from osdiff.fileio import write_atomic

    def slow_write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        _interrupt_via_other_thread()
        raise AssertionError("the interrupt should have stopped the write")

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "out.bin", slow_write)
    assert list(tmp_path.iterdir()) == []


def _kill_while_writing(cmd: list[str], folder: Path, sig: int) -> None:
    """Start `cmd`, wait until its temporary output file appears in `folder`, send `sig`."""
    import signal  # noqa: F401  (sig is a signal number)
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not any(p.name.endswith(".tmp") for p in folder.iterdir()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the command ended before writing: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.001)
    proc.send_signal(sig)
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def noise_osd(tmp_path_factory, tiny_codec_folder) -> Path:
    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (800, 1200, 3), dtype=np.uint8)).save(folder / "noise.png")
    assert main(["compress", str(folder / "noise.png"), "-m", str(tiny_codec_folder), "-q", "4"]) == 0
    return folder / "noise.osd"


@pytest.mark.parametrize("sig_name", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_killed_mid_write_leaves_no_partial_output(tmp_path, tiny_codec_folder, noise_osd, sig_name):
    """Killed while the output is being written: the output path holds nothing, or (if the
    signal came after the file was complete and linked into place) the whole image. TERM/INT
    also remove the temporary file; after KILL only a hidden `.NAME.*.tmp` can remain."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "osdiff.cli", "decompress", str(noise_osd), "-o", str(out / "noise.png"), "-m", str(tiny_codec_folder)]
    _kill_while_writing(cmd, out, getattr(signal, sig_name))
    if (out / "noise.png").exists():
        with Image.open(out / "noise.png") as done:
            done.load()  # complete, or this raises
            assert done.size == (1200, 800)
    leftovers = [p for p in out.iterdir() if p.name != "noise.png"]
    if sig_name == "SIGKILL":
        assert all(p.name.startswith(".noise.png.") and p.name.endswith(".tmp") for p in leftovers)
    else:
        assert leftovers == []


def test_fractional_quality_and_info(images, tmp_path, capsys, tiny_codec_folder):
    m = str(tiny_codec_folder)
    assert main(["compress", str(images / "a.png"), "-o", str(tmp_path / "a.osd"), "-q", "2.5", "-m", m]) == 0
    assert "quality 2.5" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "a.osd"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["quality"] == 2.5 and info["format_version"] == 2
    assert main(["info", str(tmp_path / "a.osd")]) == 0
    assert "quality: 2.5" in capsys.readouterr().out
    assert main(["decompress", str(tmp_path / "a.osd"), "-m", m]) == 0 and (tmp_path / "a.png").is_file()
    assert main(["compress", str(images / "a.png"), "-o", str(tmp_path / "b.osd"), "-q", "2.0", "-m", m]) == 0
    assert (tmp_path / "b.osd").read_bytes()[4] == 1  # a whole level: format version 1


def test_target_size_reports_quality_and_encodes(images, tmp_path, capsys, tiny_codec_folder):
    m = str(tiny_codec_folder)
    assert main(["compress", str(images / "a.png"), "-o", str(tmp_path / "a.osd"), "--size", "1MB", "-m", m]) == 0
    out = capsys.readouterr().out
    assert "target 1000000 bytes, 1 encodes" in out and "quality 4" in out


def test_unreachable_target_warns_and_writes_the_lowest_or_fails_with_strict(images, tmp_path, capsys, tiny_codec_folder):
    import osdiff

    m = str(tiny_codec_folder)
    size = str(osdiff.load(tiny_codec_folder).min_file_bytes() + 1)
    out = tmp_path / "out"
    assert main(["compress", str(images), "-o", str(out), "--size", size, "-m", m]) == 0
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert sum("osdiff: warning:" in line and "even the lowest quality gives" in line for line in err) == 2  # tqdm may share the line
    assert "2 of 2 images did not fit" in err[-1]
    assert sorted(p.name for p in out.iterdir()) == ["a.osd", "b.osd"]
    assert all(p.read_bytes()[5] == 1 for p in out.iterdir())  # quality 1
    strict = tmp_path / "strict"
    assert main(["compress", str(images), "-o", str(strict), "--size", size, "--strict", "-m", m]) == 1
    err = [line for line in _err_lines(capsys) if "osdiff: error:" in line]  # tqdm may share the line
    assert len(err) == 2 and all("over the target" in line for line in err)
    assert any("a.png: even the lowest" in line for line in err) and any("b.jpg: even the lowest" in line for line in err)
    assert not strict.exists() or list(strict.iterdir()) == []


def test_info_into_a_closed_pipe_stops_quietly():
    """`osdiff info *.osd | head -1`: the reader leaves early; no error line, exit 141 as cat's."""
    fixture = str(Path(__file__).parent / "fixtures" / "osdiff-tiny-v1.osd")
    proc = subprocess.Popen([sys.executable, "-m", "osdiff.cli", "info"] + [fixture] * 200,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == b""
