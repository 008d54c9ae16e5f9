"""The wheel round trip: built from the package's own files (no warnings from our
pyproject.toml), it holds the shipped weights (safetensors + json only), the serve page and
the licence files; installed with `pip install --no-deps` into a fresh venv that reuses the
installed dependencies, its `osdiff` command compresses and decompresses an image offline
without a word on stderr."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_LICENCES = "osdiff/weights/*/*/LICENSE*"  # as in pyproject.toml's license-files


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "HF_HUB_OFFLINE": "1"}


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env(), timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _source_copy(dst: Path) -> Path:
    """What the wheel is built from: pyproject.toml, README, LICENSE and the package."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "osdiff", dst / "osdiff", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def test_wheel_round_trip(tmp_path, photo):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build the SPDX licence form (make install upgrades it)")
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    build = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", dist, src])
    build_log = build.stdout + build.stderr
    assert not re.findall(r"\w+Warning\b|(?i:deprecat)", build_log), build_log[-3000:]

    (wheel,) = dist.glob("osdiff-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        metadata = zf.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    shipped = {p.relative_to(src).as_posix() for p in (src / "osdiff/weights").rglob("*") if p.is_file()}
    assert {n for n in shipped if n.endswith((".safetensors", ".json"))} <= names
    assert {p.relative_to(src).as_posix() for p in (src / "osdiff/serve/static").iterdir()} <= names
    licences = {p.relative_to(src).as_posix() for p in src.glob(WEIGHT_LICENCES)}
    assert "osdiff/weights/taef2/vae/LICENSE-TAESD.txt" in licences  # the third-party TAEF2 weights
    assert licences <= names  # beside the weights ...
    vectors = {p.relative_to(src).as_posix() for p in (src / "osdiff/conformance_vectors").rglob("*") if p.is_file()}
    assert vectors and vectors <= names  # an installed wheel can check itself (osdiff conformance)
    assert {f"{info}/licenses/{n}" for n in ["LICENSE", *licences]} <= names  # ... and in the metadata
    assert not [n for n in names if n.endswith((".pth", ".pt", ".bin", ".ckpt", ".pkl"))]

    # a fresh venv whose only extra is a .pth naming this environment's site-packages (no downloads)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("-packages") and os.path.isdir(p))}
    (purelib / "_reuse_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel])
    where = _run([python, "-c", "import osdiff; print(osdiff.__file__)"], cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(purelib), where

    work = tmp_path / "work"
    work.mkdir()
    Image.fromarray(photo).save(work / "a.png")
    osdiff = venv / "bin" / "osdiff"
    compress = _run([osdiff, "compress", "a.png", "-o", "a.osd"], cwd=work)
    decompress = _run([osdiff, "decompress", "a.osd", "-o", "b.png"], cwd=work)
    assert compress.stderr == "" and decompress.stderr == ""
    assert Image.open(work / "b.png").size == (photo.shape[1], photo.shape[0])
