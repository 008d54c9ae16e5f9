"""`osdiff eval` and `osdiff compress` split across processes (torchrun, 2 CPU processes) give
the rows, summaries and files one process gives; an error on one rank stops the whole job."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from osdiff import distributed
from osdiff.cli import main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "osdiff.cli"]
REPO = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # TMPDIR: torchrun's log folders stay in the test's folder, not in /tmp
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TMPDIR": str(cwd)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run(TORCHRUN + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture
def one_thread():
    """The split run's ranks use one thread each; so does the one-process run compared with it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _photos(folder: Path, n: int, h: int = 256, w: int = 288) -> Path:
    """`n` noisy synthetic photos, h x w; the second one twice as wide."""
    folder.mkdir()
    for i in range(n):
        rng = np.random.default_rng(i)
        w = 2 * w - 32 if i == 1 else w
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([np.sin(x / (4 + i)), np.cos(y / 7.0), np.sin((x + y) / 3.0)], -1) * 0.35 + 0.5
        img += rng.normal(0, 0.03, img.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _close(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    return x == y or (np.isnan(x) and np.isnan(y)) or abs(x - y) <= 1e-6 * max(1.0, abs(x), abs(y))


def test_shard_partitions_sorted_items_by_rank(monkeypatch):
    items = [5, 3, 9, 1, 7]
    shares = [distributed.shard(items, r, 2) for r in range(2)]
    assert shares == [[1, 5, 9], [3, 7]]
    assert sorted(sum((distributed.shard(items, r, 3) for r in range(3)), [])) == sorted(items)
    assert distributed.shard(items, 0, 1) == [1, 3, 5, 7, 9] and distributed.shard([], 1, 2) == []
    with pytest.raises(ValueError):
        distributed.shard(items, 2, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (2, 1, False)
    assert distributed.shard(items) == [3, 7]


def test_one_process_touches_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.session():
        assert not torch.distributed.is_initialized() and not distributed.active()
        assert distributed.gather({"a": 1}) == [{"a": 1}] and distributed.broadcast(3) == 3
        distributed.agree(None)
        with pytest.raises(distributed.JobFailed, match="boom"):
            distributed.agree("boom")
        with pytest.raises(KeyError):  # not split: errors pass unchanged
            with distributed.together():
                raise KeyError("x")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(distributed.OSDiffError, match="WORLD_SIZE"):
        distributed.world_size()


def test_split_eval_matches_one_process_and_resumes(tmp_path, one_thread):
    """2 ranks resume a results folder (one row lacks a metric, one image is not done): the
    CSV, aggregate and summary (LPIPS, PSNR, FID/KID over all images' 3 patches) match one
    process's run within 1e-6; every row and feature file is there once."""
    data = _photos(tmp_path / "data", 2)
    args = ["--codecs", "webp", "--anchor", "webp", "--metrics", "psnr,lpips", "--no-crops"]
    assert main(["eval", str(data), "--out", str(tmp_path / "one"), *args]) == 0
    one = _rows(tmp_path / "one" / "per_image.csv")
    # a partial copy: image 0's rows only (rank 0's), one of them without its PSNR; image 1's
    # features gone (rank 1's)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    kept = [dict(r) for r in one if r["image"] == "img0.png"]
    kept[3]["psnr"] = ""
    with open(tmp_path / "two" / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(one[0]))
        writer.writeheader()
        writer.writerows(kept)
    for f in (tmp_path / "two" / "features").rglob("*.npy"):
        if "img0" not in f.name:
            f.unlink()
    for name in ("summary.json", "aggregate.csv"):
        (tmp_path / "two" / name).unlink()
    run = _torchrun(["eval", "data", "--out", "two", *args], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    two = _rows(tmp_path / "two" / "per_image.csv")
    assert [(r["image"], r["codec"], r["setting"]) for r in two] == [(r["image"], r["codec"], r["setting"]) for r in one]
    assert all(_close(a[k], b[k]) for a, b in zip(one, two) for k in a), "rows differ"
    assert run.stdout.count("report:") == 1 and run.stdout.count("| webp | 90 |") == 1  # rank 0 prints, once
    assert _rows(tmp_path / "two" / "aggregate.csv") and all(
        _close(a[k], b[k]) for a, b in zip(_rows(tmp_path / "one" / "aggregate.csv"), _rows(tmp_path / "two" / "aggregate.csv")) for k in a)
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    for codec, points in s1["curves"].items():
        for p, q in zip(points, s2["curves"][codec]):
            assert p.keys() == q.keys() and all(_close(str(p[k]), str(q[k])) for k in p), (codec, p, q)
    assert np.isfinite(s1["curves"]["webp"][0]["kid"]) and s1["curves"]["webp"][0]["patches_inception_hific"] == 3
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one") and not any(f.endswith(".tmp") for f in files(tmp_path / "two"))


def test_split_compress_matches_one_process(tmp_path, tiny_codec_folder, one_thread, capsys):
    """Each rank compresses its share: the same .osd bytes as one process, each file written
    once (no --force, so a second write would fail), rank 0 prints every line once in input
    order; an unreadable input is one error line and a non-zero exit for the job."""
    data = _photos(tmp_path / "data", 3, 64, 96)
    (data / "img2.png").write_bytes(b"not an image")  # rank 0's second file, rank 1 has one
    args = ["-m", str(tiny_codec_folder), "-q", "1"]
    assert main(["compress", str(data), "-o", str(tmp_path / "one"), *args]) == 1
    printed = capsys.readouterr()
    run = _torchrun(["compress", "data", "-o", "two", *args], tmp_path)
    assert run.returncode != 0
    assert run.stdout.replace("two/", "X/") == printed.out.replace(f"{data}/", "data/").replace(f"{tmp_path / 'one'}/", "X/")
    assert run.stdout.count("->") == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("osdiff:")]
    assert errors == ["osdiff: error: data/img2.png: not a readable image (not a format Pillow knows)"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["img0.osd", "img1.osd"]
    for name in ("img0.osd", "img1.osd"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


SCRIPT = """
import sys
from osdiff import distributed as dist

with dist.session():
    rank = dist.rank()
    assert dist.active() and dist.world_size() == 2
    assert dist.gather(dist.shard(range(5))) == ([[0, 2, 4], [1, 3]] if rank == 0 else None)
    assert dist.broadcast(f"from {rank}") == "from 0"
    try:
        with dist.together():
            if rank == 1:
                raise dist.OSDiffError("photo.png: not a readable image")
        print(f"rank {rank} went on", flush=True)
    except dist.JobFailed as exc:
        if dist.is_main():
            print(f"osdiff: error: {exc}", file=sys.stderr)
        sys.exit(1)
"""


def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    """torchrun, 2 processes: shares, gather and broadcast across ranks; an error on rank 1 in
    a block every rank runs stops both (no hang), reported once, naming the rank."""
    (tmp_path / "split_check.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    run = subprocess.run([*TORCHRUN[:-2], "split_check.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "went on" not in run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("osdiff:")]
    assert errors == ["osdiff: error: rank 1: photo.png: not a readable image"]


def test_eval_rows_are_written_in_batches_and_in_grid_order(tmp_path):
    """Rows filled in or added are not written one by one (no rewrite per row); a forced flush
    writes them all, and the file ends in (image, codec, setting) order with others after."""
    from osdiff.evaluation.runner import _read_rows, _RowStore

    path = tmp_path / "per_image.csv"
    fields = ["image", "codec", "setting", "bytes", "bpp", "psnr"]
    row = lambda image, setting, psnr=None: {"image": image, "codec": "jpeg", "setting": setting, "bytes": 10.0,  # noqa: E731
                                             "bpp": 1.0, "psnr": psnr}
    old = [row("b.png", "5", 30.0), row("a.png", "5"), row("z.png", "5", 20.0)]
    store = _RowStore(path, fields, [dict(r) for r in old], every=3600)
    store.flush(force=True)  # nothing new: no file
    assert not path.exists()
    store.rows[1]["psnr"] = 31.0
    store.changed = True
    store.add(row("a.png", "9", 40.0))
    store.flush()
    assert not path.exists()  # waits for `every` seconds or the end
    store.put_in_order([("a.png", "jpeg", "5"), ("a.png", "jpeg", "9"), ("b.png", "jpeg", "5")])
    store.flush(force=True)
    rows, columns = _read_rows(path)
    assert columns == fields and [(r["image"], r["setting"], r["psnr"]) for r in rows] == [
        ("a.png", "5", 31.0), ("a.png", "9", 40.0), ("b.png", "5", 30.0), ("z.png", "5", 20.0)]
    store.add(row("b.png", "9", 33.0))
    store.flush(force=True)  # only new rows: appended
    assert path.read_text().splitlines()[-1] == "b.png,jpeg,9,10.0,1.0,33.0" and len(_read_rows(path)[0]) == 5


def test_compress_refuses_two_inputs_with_one_output(tmp_path, capsys):
    """Two inputs of the same name into one folder: an error before anything is written (split
    or not, no output is written twice, even with --force)."""
    for folder in ("a", "b"):
        _photos(tmp_path / folder, 1, 32, 32)
    out = tmp_path / "out"
    assert main(["compress", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out), "--force"]) == 1
    assert capsys.readouterr().err.strip() == f"osdiff: error: {out / 'img0.osd'}: two inputs would be written there (inputs with the same name into one folder)"
    assert not out.exists()
