"""The compressai baselines (elic-tiny, hific-tiny family): coding through the `.osd` format,
save/load, training through `osdiff train`, and use from the CLI and `osdiff eval`."""
from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import osdiff
from osdiff.baseline_pipeline import BaselinePipeline
from osdiff.cli import main
from osdiff.config import BaselineArchitecture
from osdiff.entropy.bitstream import pack, parse
from osdiff.errors import OSDiffError
from osdiff.models.baselines import LearnedImageCodec
from osdiff.training.config import BaselineStage, DataConfig, LossConfig, TrainConfig, load_config
from osdiff.training.trainer import Trainer

ARCHS = {
    "elic2022-chandelier": BaselineArchitecture("elic2022-chandelier", N=8, M=16, groups=(2, 2, 4, 8), num_rates=3,
                                                discriminator_channels=(8, 16)),
    "mean-scale-hyperprior": BaselineArchitecture("mean-scale-hyperprior", N=8, M=16, num_rates=3,
                                                  discriminator_channels=(8, 16)),
}


def _codec_folder(root: Path, arch: BaselineArchitecture, name: str) -> Path:
    torch.manual_seed(0)
    codec = LearnedImageCodec(arch.architecture, arch.N, arch.M, arch.groups, arch.num_rates)
    with torch.no_grad():  # rates that differ: scale each rate's synthesis output a little
        for r, model in enumerate(codec.rates):
            for p in model.g_a.parameters():
                p.mul_(1.0 + r)
    codec.update(force=True)
    BaselinePipeline(codec=codec, model_name=name).save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module", params=sorted(ARCHS))
def baseline_folder(request, tmp_path_factory) -> Path:
    return _codec_folder(tmp_path_factory.mktemp("baseline"), ARCHS[request.param], f"{request.param[:4]}-test")


def test_round_trip_through_the_osd_format(baseline_folder, photo):
    codec = osdiff.load(baseline_folder)
    assert isinstance(codec, BaselinePipeline) and codec.num_quality_levels == 3
    for q in (1, 3):
        data = codec.compress(photo, quality=q)
        header, strings = parse(data)
        assert (header.model_name, header.quality, header.width, header.height) == (codec.config.model_name, q, 56, 40)
        assert (header.pad_w, header.pad_h) == (64 - 56, 64 - 40) and len(strings) == codec.num_strings()
        assert len(data) == 32 + len(header.model_name) + 4 * len(strings) + sum(map(len, strings))
        out = codec.decompress(data)
        assert out.size == (56, 40) and out.mode == "RGB"
        again = osdiff.load(baseline_folder)  # a fresh load decodes the same pixels (stored CDF tables)
        assert np.array_equal(np.asarray(again.decompress(data)), np.asarray(out))


def test_refuses_other_models_files_steps_and_garbage(baseline_folder, tiny_codec, photo):
    codec = osdiff.load(baseline_folder)
    with pytest.raises(OSDiffError, match="not by the loaded model"):
        codec.decompress(tiny_codec.compress(photo))
    data = codec.compress(photo)
    with pytest.raises(OSDiffError, match="not a diffusion codec"):
        codec.decompress(data, steps=2)
    header, strings = parse(data)
    rng = np.random.default_rng(0)
    for n in (0, 7, 5000):  # well-formed files whose strings are garbage: an image or one-line error, no crash
        junk = [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for _ in strings]
        try:
            assert codec.decompress(pack(header, junk)).size == (56, 40)
        except OSDiffError:
            pass


def test_cli_compress_decompress_bench(baseline_folder, tmp_path, photo, capsys):
    Image.fromarray(photo).save(tmp_path / "a.png")
    m = str(baseline_folder)
    assert main(["compress", str(tmp_path / "a.png"), "-o", str(tmp_path / "a.osd"), "-q", "3", "-m", m]) == 0
    assert main(["decompress", str(tmp_path / "a.osd"), "-o", str(tmp_path / "b.png"), "-m", m]) == 0
    assert Image.open(tmp_path / "b.png").size == (56, 40)
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "a.osd"), "-o", str(tmp_path / "c.png"), "-m", m, "--steps", "3"]) == 1
    assert "not a diffusion codec" in capsys.readouterr().err and not (tmp_path / "c.png").exists()
    assert main(["bench", "--model", m, "--size", "64x64", "--steps", "1", "--repeat", "1", "--warmup", "0"]) == 0
    assert "decode.total[1 step]" in capsys.readouterr().out


def _train_config(out: Path, folder: Path, arch: BaselineArchitecture, steps: int, **losses) -> TrainConfig:
    return TrainConfig(
        model="baseline", model_name="baseline-test", output_dir=str(out), threads=2, checkpoint_minutes=1000, log_every=1,
        data=DataConfig(train_folders=[str(folder)], val_folders=[str(folder)], max_side=128),
        baseline=arch, losses=LossConfig(rate_lambdas=[10.0, 100.0, 1000.0], adversarial_start=0, **losses),
        stages=[BaselineStage(steps=steps, batch_size=2, crop=64, lr=3e-3, warmup_steps=1)],
    )


def _log(out: Path, kind: str = "log") -> list[dict]:
    with open(out / f"{kind}-0-baseline.csv") as f:
        return list(csv.DictReader(f))


def test_elic_training_reduces_loss_and_orders_rates(tmp_path, image_folder):
    cfg = _train_config(tmp_path / "run", image_folder, ARCHS["elic2022-chandelier"], steps=20, perceptual=0.0, adversarial=0.0)
    Trainer(cfg).run()
    rows = _log(tmp_path / "run")
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    val = _log(tmp_path / "run", kind="val")[-1]
    bpp = [float(val[f"bpp_r{r}"]) for r in (1, 2, 3)]
    assert bpp[0] < bpp[2], bpp  # a larger lambda buys more bits
    codec = osdiff.load(tmp_path / "run" / "model")
    assert isinstance(codec, BaselinePipeline) and codec.config.model_name == "baseline-test"


def test_hific_training_gives_generator_and_discriminator_gradients(tmp_path, image_folder, monkeypatch):
    cfg = _train_config(tmp_path / "run", image_folder, ARCHS["mean-scale-hyperprior"], steps=1, perceptual=0.01, adversarial=0.01)
    seen = {}
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        key = "disc" if self.param_groups[0]["betas"][0] == 0.5 else "main"
        seen[key] = sum(float(p.grad.abs().sum()) for g in self.param_groups for p in g["params"] if p.grad is not None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    Trainer(cfg).run()
    assert seen["main"] > 0 and seen["disc"] > 0
    assert float(_log(tmp_path / "run")[0]["adv_d"]) > 0


def test_baseline_resume_is_exact(tmp_path, image_folder, photo):
    arch = ARCHS["mean-scale-hyperprior"]
    straight = _train_config(tmp_path / "a", image_folder, arch, steps=4, perceptual=0.01, adversarial=0.01)
    Trainer(straight).run()
    chunked = replace(straight, output_dir=str(tmp_path / "b"))
    assert Trainer(chunked).run(max_steps=2) is None
    assert Trainer(chunked).run() is not None
    a, b = osdiff.load(tmp_path / "a" / "model"), osdiff.load(tmp_path / "b" / "model")
    sa, sb = a.codec.state_dict(), b.codec.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.compress(photo) == b.compress(photo)


def test_eval_takes_a_baseline_by_folder(tmp_path, photo, capsys):
    baseline_folder = _codec_folder(tmp_path, ARCHS["mean-scale-hyperprior"], "msh-test")
    data = tmp_path / "photos"
    data.mkdir()
    Image.fromarray(photo).save(data / "p.png")
    out = tmp_path / "eval"
    spec = f"mybase={baseline_folder}"
    assert main(["eval", str(data), "--codecs", f"{spec},jpeg", "--out", str(out), "--crop-bpp", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "| mybase vs |" in printed and "\n| jpeg |" in printed  # BD-rate of the learned codec against each other
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["setting"] for r in rows if r["codec"] == "mybase") == ["1", "2", "3"]
    assert "mybase" in (out / "report.html").read_text() and "target 0.500 bpp" in (out / "report.html").read_text()


def test_baseline_configs_load(tmp_path):
    root = Path(__file__).resolve().parents[1] / "configs"
    elic, hific = load_config(root / "elic-tiny.yaml"), load_config(root / "hific-tiny.yaml")
    assert elic.model == hific.model == "baseline" and [s.name for s in elic.stages] == ["baseline"]
    assert elic.baseline.architecture == "elic2022-chandelier" and hific.baseline.architecture == "mean-scale-hyperprior"
    assert elic.losses.adversarial == 0 and hific.losses.adversarial > 0 and hific.losses.perceptual > 0
    assert elic.data == hific.data == load_config(root / "tiny.yaml").data  # the same photos as osdiff-tiny
    assert len(elic.losses.rate_lambdas) == elic.baseline.num_rates == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nstages: [{name: baseline, steps: 3}]\n")
    with pytest.raises(OSDiffError, match="goes with model 'baseline'"):
        load_config(bad)


def test_serve_runs_a_baseline(tmp_path, photo):
    import base64
    import io

    from fastapi.testclient import TestClient

    from osdiff.serve import create_app

    pipe = osdiff.load(_codec_folder(tmp_path, ARCHS["mean-scale-hyperprior"], "msh-serve"))
    client = TestClient(create_app(pipe))
    assert client.get("/api/info").json()["model"] == "msh-serve"
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    body = client.post("/api/compress?quality=2", content=buf.getvalue()).json()
    osd = base64.b64decode(body["file"])
    assert parse(osd)[0].model_name == "msh-serve" and body["width"] == 56
    assert client.post("/api/decompress", content=osd).status_code == 200
