"""Train osdiff-tiny on a lent GPU within a time budget; results go to $OUT.

Run through scripts/device_train.sh (it installs the carried wheels first). Two modes:

  bootstrap  (the shipped osdiff-tiny is not a v2 model yet) the decoder and denoiser stages of
             configs/tiny-v2.yaml, then the codec stage twice side by side for --ab-minutes each,
             once per decoding start ("hint": hint noised to t = 299; "noise": pure noise at
             t = 999, the official procedure), the better one on the validation crops (BD-rate
             on HaarPSI, else PSNR) continued for the rest of the budget;
  continue   v3's codec stage (configs/tiny-v3-cpu.yaml: compressor, control module and UNet on
             LPIPS + latent/hint MSE + rate + both discriminators) started from the shipped
             weights (osdiff/weights/osdiff-tiny), or from --init-model (default .carry/init-model
             when it exists: a model trained elsewhere, put there by prepare_device_carry.py
             --init-model), --batch crops of 256 px. LPIPS on VGG16 where its backbone is on the
             machine, else on AlexNet (the carried one: VGG16's does not fit in 64 MiB); the
             summary names which, and the held-out evaluation then leaves that one out. A base
             model that encodes with the slim student encoder trains it with the codec
             (train_encoder, as configs/tiny-v3-joint-encoder-cpu.yaml); --init-vae (default
             .carry/init-vae when it exists, put there by prepare_device_carry.py --init-vae)
             gives the base model such an autoencoder.

$OUT receives: model.tar.part-* (the trained model folder, float16, split below 15 MiB),
logs.tar (every log/val CSV and the configs used), summary.json, conformance-cuda.txt (the
output of `osdiff conformance --device cuda`, run first) and, in continue mode, students trained
beside the codec run on the same GPU, each as an autoencoder folder (`vae/`):
encoder-vae.tar with --encoder-batch (the slim student encoder, configs/tiny-v3-encoder-cpu.yaml),
decoder-vae.tar with --decoder-batch (--decoder-recipe fast: the fast decoder,
configs/tiny-v3.4-fastdec-cpu.yaml; photo: TAEF2's decoder fine-tuned toward the photos on the
codec's outputs, configs/tiny-v3.4-photodec-cpu.yaml; fast14: the base model's first 14 decoder
layers + a head fitted in closed form, taught by its decoder, configs/tiny-v3.5-fastdec14-cpu.yaml;
scripts/swap_decoder.py puts it into the trained model).
--device cpu is a dry run (a few steps of each stage, small crops) that checks the whole path;
without .carry/data (scripts/prepare_device_carry.py makes it) it trains and validates on the
config's held-out photo folders (../shared/data/images/...).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ".carry/data"
sys.path.insert(0, str(ROOT))


def plain(obj):
    """A config as YAML-safe data (tuples -> lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def write_config(cfg, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(plain(cfg), sort_keys=False))
    return path


def train(cfg, work: Path, name: str, device: str) -> subprocess.Popen:
    """`osdiff train` on `cfg` (written to work/NAME.yaml) in a subprocess (its own CUDA
    context), output to work/NAME.log."""
    cmd = [sys.executable, "-m", "osdiff.cli", "train", "--config", str(write_config(cfg, work / f"{name}.yaml")), "--device", device]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT)


def succeeded(proc: subprocess.Popen, work: Path, name: str) -> bool:
    """Wait for a `train` run; on failure print the end of its log."""
    if proc.wait() == 0:
        return True
    print((work / f"{name}.log").read_text()[-3000:], file=sys.stderr)
    return False


def last_val(run: Path, stage: str = "codec") -> dict:
    import csv

    files = sorted(run.glob(f"val-*-{stage}.csv"))
    if not files:
        return {}
    rows = list(csv.DictReader(open(files[-1])))
    return {k: float(v) for k, v in rows[-1].items() if k not in ("stage", None) and v not in (None, "")} if rows else {}


def curve(row: dict, metric: str) -> tuple[list[float], list[float]]:
    levels = sorted(int(k.split("_q")[1]) for k in row if k.startswith("bpp_q"))
    return [row[f"bpp_q{q}"] for q in levels], [row[f"{metric}_q{q}"] for q in levels]


def compare(a: dict, b: dict) -> dict:
    """BD-rate of b against a on the validation crops (negative: b needs fewer bits)."""
    from osdiff.evaluation.bdrate import bd_rate

    out = {}
    for metric in ("haarpsi", "psnr"):
        if f"{metric}_q1" in a and f"{metric}_q1" in b:
            out[metric] = bd_rate(*curve(a, metric), *curve(b, metric))
    return out


def lpips_backbone() -> str | None:
    """'vgg' where VGG16's features are on this machine (the usual LPIPS training network), else
    'alex' where AlexNet's are, else None."""
    from osdiff.quality.backbones import ALEXNET, VGG16, BackboneMissing, backbone_file

    for net, backbone in (("vgg", VGG16), ("alex", ALEXNET)):
        try:
            backbone_file(backbone)
            return net
        except BackboneMissing:
            continue
    return None


ENCODER_RECIPE = "tiny-v3-encoder-cpu.yaml"  # the encoder side run: the slim student of TAEF2's encoder
DECODER_RECIPES = {  # --decoder-recipe -> the decoder side run's recipe
    "fast": "tiny-v3.4-fastdec-cpu.yaml",  # the fast decoder, toward TAEF2's decoding of the base model's outputs
    "photo": "tiny-v3.4-photodec-cpu.yaml",  # the base model's own (TAEF2-layout) decoder, toward the photos on its outputs
    # the base model's decoder's first 14 layers + a head fitted in closed form, taught by that
    # decoder (0.99 s decodes at 512x768 on 2 cores; docs/tiny-v3.md)
    "fast14": "tiny-v3.5-fastdec14-cpu.yaml",
}


def side_config(name: str, recipe: str, folders: dict, work: Path, base_model: Path, batch: int, steps: int,
                minutes: float | None, lpips_net: str | None = None):
    """The side run `name`'s `recipe` (a file in configs/) on the carried photos, from
    `base_model` (its TAEF2 encoder's student, or its codec's outputs for the decoder): `batch`
    crops of 256 px (the carried photos' shorter side is 272 px) for `minutes` (None: a dry run's
    3 steps)."""
    from osdiff.training.config import load_config

    cfg = load_config(ROOT / "configs" / recipe)
    stage = dataclasses.replace(cfg.stages[0], batch_size=batch if minutes else 2, crop=256,
                                max_minutes=minutes, steps=steps if minutes else 3, warmup_steps=min(cfg.stages[0].warmup_steps, 100) if minutes else 1)
    if not minutes and getattr(stage, "decoder_head_fit", 0):
        stage = dataclasses.replace(stage, decoder_head_fit=2)
    losses = dataclasses.replace(cfg.losses, lpips_net=lpips_net) if lpips_net else cfg.losses
    # a recipe whose teacher is a model folder (fast14: the shipped model's own decoder) is taught by
    # the base model's decoder here; the others by the packaged TAEF2
    teacher = str(base_model) if cfg.taesd_weights else None
    return dataclasses.replace(
        cfg, output_dir=str(work / "runs" / name), init_from=str(base_model), checkpoint_minutes=1.0, threads=0,
        taesd_weights=teacher, val_every=500 if minutes else 2, stages=[stage], losses=losses,
        data=dataclasses.replace(cfg.data, **folders, latent_cache=str(work / f"latents-{name}")))


def with_autoencoder(model: Path, vae_dir: Path, work: Path) -> Path:
    """`model` with the autoencoder folder `vae_dir` in place of its own (the same latent
    statistics, so the codec still fits), written to work/base-model."""
    from osdiff.models.taesd import TAESDAutoencoder
    from osdiff.pipeline import OSDiffPipeline

    pipe = OSDiffPipeline.from_pretrained(model)
    vae = TAESDAutoencoder.from_pretrained(vae_dir).to(pipe.vae.dtype)
    if not isinstance(pipe.vae, TAESDAutoencoder) or not pipe.vae.same_latent_space(vae):
        raise SystemExit(f"{vae_dir}: other latent statistics than {model}'s; the codec would not fit it")
    pipe.register_modules(vae=vae)
    pipe.save_pretrained(work / "base-model")
    return work / "base-model"


def steps_per_second(run: Path, stage: str = "codec") -> float | None:
    import csv

    files = sorted(run.glob(f"log-*-{stage}.csv"))
    if not files:
        return None
    rows = list(csv.DictReader(open(files[-1])))
    if len(rows) < 3:
        return None
    dt = float(rows[-1]["time"]) - float(rows[1]["time"])
    return (int(rows[-1]["step"]) - int(rows[1]["step"])) / dt if dt > 0 else None


def ship(model: Path, out: Path, work: Path) -> list[str]:
    """Model folder -> float16 copy -> tar split in parts below 15 MiB."""
    from osdiff.build import save_for_shipping
    from osdiff.pipeline import OSDiffPipeline

    pipe = OSDiffPipeline.from_pretrained(model)
    staging = work / "ship"
    save_for_shipping(pipe, staging)
    tar = work / "model.tar"
    with tarfile.open(tar, "w") as t:
        t.add(staging, arcname="model")
    data, parts = tar.read_bytes(), []
    for i in range(0, len(data), 15 * 2**20):
        name = f"model.tar.part-{i // (15 * 2**20):02d}"
        (out / name).write_bytes(data[i : i + 15 * 2**20])
        parts.append(name)
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time in all (GPU)")
    parser.add_argument("--ab-minutes", type=float, default=0.0,
                        help="bootstrap: compare the decoding starts, each codec run this long (0: 'hint' only)")
    parser.add_argument("--mode", choices=("auto", "bootstrap", "continue"), default="auto")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="train/ and val/ image folders (dry run without .carry/data: the config's held-out photos)")
    parser.add_argument("--init-model", default=".carry/init-model", help="a v2 model folder to continue (if it exists)")
    parser.add_argument("--init-vae", default=".carry/init-vae",
                        help="an autoencoder folder (if it exists) that replaces the base model's, e.g. one that encodes "
                             "with the slim student encoder (then trained with the codec)")
    parser.add_argument("--batch", type=int, default=16, help="continue: crops per step (256 px)")
    parser.add_argument("--encoder-batch", type=int, default=0,
                        help="continue: beside the codec run, distil the slim student encoder "
                             "(configs/tiny-v3-encoder-cpu.yaml) with this many crops per step, e.g. 32 "
                             "(0: not; on an H200 it slowed the codec run from 3.9 to 3.1 steps/s and ran 3.8 steps/s itself)")
    parser.add_argument("--encoder-steps", type=int, default=20000, help="continue: the student's steps (its cosine schedule)")
    parser.add_argument("--decoder-batch", type=int, default=0,
                        help="continue: beside the codec run, train a decoder (--decoder-recipe) on the base model's "
                             "outputs, this many crops per step, e.g. 16 (0: not)")
    parser.add_argument("--decoder-steps", type=int, default=20000, help="continue: the decoder side run's steps (its cosine schedule)")
    parser.add_argument("--decoder-recipe", choices=sorted(DECODER_RECIPES), default="fast",
                        help="the decoder side run: fast (the fast decoder, toward TAEF2's decoding; default), photo "
                             "(TAEF2's decoder fine-tuned toward the photos, configs/tiny-v3.4-photodec-cpu.yaml) or fast14 "
                             "(the base model's first 14 decoder layers + a fitted head, taught by its decoder, "
                             "configs/tiny-v3.5-fastdec14-cpu.yaml)")
    parser.add_argument("--taesd", default=None, help="a folder with taef2_encoder.pth / taef2_decoder.pth (default: the packaged copy)")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/osdiff-device-out"))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    import torch  # smoke test first: everything the run needs imports

    import compressai, diffusers, piq  # noqa: F401,E401
    import osdiff
    from osdiff.config import DecodingConfig
    from osdiff.hub import DEFAULT_MODEL, resolve
    from osdiff.models.taesd import TAESDAutoencoder
    from osdiff.training.config import load_config

    dry = args.device == "cpu"
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, osdiff from {osdiff.__file__}", flush=True)
    if not dry and not torch.cuda.is_available():
        print("no GPU visible: use --device cpu for a dry run", file=sys.stderr)
        return 1
    if not dry:  # the trained model's conformance vectors on this GPU first (issue 16): a record, not a gate
        check = subprocess.run([sys.executable, "-m", "osdiff.cli", "conformance", "--device", "cuda", "-m", "osdiff-tiny"], cwd=ROOT,
                               capture_output=True, text=True)
        (out / "conformance-cuda.txt").write_text(check.stdout + check.stderr)
        print(check.stdout.strip().splitlines()[-1] if check.stdout.strip() else check.stderr[-500:], flush=True)
    base_model = resolve(DEFAULT_MODEL)  # the shipped model
    if (ROOT / args.init_model / "model_index.json").is_file():  # a v2 model trained elsewhere
        base_model = resolve((ROOT / args.init_model).resolve())
    if (ROOT / args.init_vae / "config.json").is_file():  # e.g. the student encoder distilled on the CPU
        base_model = with_autoencoder(base_model, (ROOT / args.init_vae).resolve(), Path(tempfile.mkdtemp(prefix="osdiff-base-")))
    base_pipe = osdiff.load(base_model)
    is_v2 = isinstance(base_pipe.vae, TAESDAutoencoder)
    if args.encoder_batch > 0 and getattr(base_pipe.vae, "slim_encoder", False):
        print("--encoder-batch distils a student of TAEF2's encoder, but the base model already encodes with a student "
              "(it trains with the codec): leave --encoder-batch out", file=sys.stderr)
        return 1
    mode = args.mode if args.mode != "auto" else ("continue" if is_v2 else "bootstrap")

    cfg = load_config(ROOT / "configs" / ("tiny-v2.yaml" if mode == "bootstrap" else "tiny-v3-cpu.yaml"))
    data = (ROOT / args.data).resolve()
    if (data / "train").is_dir():
        folders = dict(train_folders=[str(data / "train")], val_folders=[str(data / "val")])
    elif dry and args.data == DEFAULT_DATA:  # a fresh checkout: the config's held-out photos (only the path is checked)
        val = [str((ROOT / f).resolve()) for f in cfg.data.val_folders]
        folders = dict(train_folders=val, val_folders=val)
    else:
        print(f"{data / 'train'}: no image folder (scripts/prepare_device_carry.py makes .carry/data)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="osdiff-device-"))  # run folders, configs, logs
    cfg = dataclasses.replace(
        cfg, taesd_weights=str((ROOT / args.taesd).resolve()) if args.taesd else None, checkpoint_minutes=1.0,
        data=dataclasses.replace(cfg.data, **folders, latent_cache=str(work / "latents") if cfg.data.latent_cache else None),
        threads=0, val_every=cfg.val_every if mode == "bootstrap" else 200,
    )
    if mode == "continue":
        net = lpips_backbone()
        if net is None:
            print("no LPIPS backbone on this machine (scripts/prepare_device_carry.py carries AlexNet's)", file=sys.stderr)
            return 1
        cfg = dataclasses.replace(cfg, losses=dataclasses.replace(cfg.losses, lpips_net=net),
                                  stages=[dataclasses.replace(cfg.stages[0], batch_size=args.batch)])
    if dry:  # a few steps of everything, small crops
        cfg = dataclasses.replace(cfg, val_every=2, stages=[
            dataclasses.replace(s, steps=3, batch_size=2, crop=128, warmup_steps=1, max_minutes=None) for s in cfg.stages])
    runs = work / "runs"
    summary: dict = {"mode": mode, "device": torch.cuda.get_device_name(0) if not dry else "cpu"}
    if mode == "continue":
        summary["lpips_net"] = cfg.losses.lpips_net
    remaining = lambda: args.minutes - (time.time() - t_start) / 60  # noqa: E731

    if mode == "bootstrap":
        base = runs / "base"
        pre = dataclasses.replace(cfg, output_dir=str(base), stages=cfg.stages[:2])
        if not succeeded(train(pre, work, "pre", args.device), work, "pre"):
            return 1
        procs = {}
        starts = (("hint", 299), ("noise", 999)) if args.ab_minutes > 0 else (("hint", 299),)
        for start, t in starts:
            run = runs / start
            subprocess.run(["cp", "-r", str(base), str(run)], check=True)
            stages = list(cfg.stages)
            if not dry:  # without an A/B, the one codec run is the first part of the budget
                stages[2] = dataclasses.replace(stages[2], max_minutes=args.ab_minutes or 1.0)
            variant = dataclasses.replace(cfg, output_dir=str(run), stages=stages, decoding=DecodingConfig(timestep=t, start=start))
            procs[start] = (train(variant, work, start, args.device), variant)
        if not all([succeeded(proc, work, start) for start, (proc, _) in procs.items()]):
            return 1
        vals = {start: last_val(runs / start) for start in procs}
        summary["ab"] = {"val": vals, "steps_per_second": {s: steps_per_second(runs / s) for s in procs}}
        winner = "hint"
        if "noise" in vals:
            bd = summary["ab"]["bd_rate_noise_vs_hint"] = compare(vals["hint"], vals["noise"])
            score = bd.get("haarpsi") if bd.get("haarpsi") is not None else bd.get("psnr")
            # no overlap of the rate ranges: the one with the better quality at its own top level
            better = vals["noise"].get("haarpsi_q4", 0) > vals["hint"].get("haarpsi_q4", 0)
            winner = "noise" if (score < 0 if score is not None else better) else "hint"
        summary["winner"] = winner
        print(json.dumps(summary, indent=1), flush=True)
        run, (_, variant) = runs / winner, procs[winner]
        minutes = max(0.2, remaining() - 1.0)  # leave a minute for shipping
        rate = summary["ab"]["steps_per_second"][winner] or 1.0
        steps = 3 if dry else int(rate * 1.4 * 60 * minutes)  # alone it runs faster than side by side
        final = dataclasses.replace(variant.stages[2], steps=max(steps, 10), warmup_steps=1 if dry else 20,
                                    lr=variant.stages[2].lr * 0.6, max_minutes=None if dry else minutes)
        variant = dataclasses.replace(variant, stages=[*variant.stages, final])
    else:
        run = runs / "continue"
        minutes = max(0.2, remaining() - 1.0)
        # trained weights go on at most at 1e-4 (5e-4 turns a trained model to NaN in 3 steps)
        stage = dataclasses.replace(cfg.stages[-1], max_minutes=None if dry else minutes, warmup_steps=1 if dry else 20,
                                    lr=min(cfg.stages[-1].lr, 1e-4))
        if getattr(base_pipe.vae, "slim_encoder", False):  # a model that encodes with the student encoder:
            # it learns with the codec, anchored to TAEF2's latents (configs/tiny-v3-joint-encoder-cpu.yaml)
            stage = dataclasses.replace(stage, train_encoder=True, encoder_margin=4)
            summary["train_encoder"] = True
        variant = dataclasses.replace(cfg, output_dir=str(run), stages=[stage], init_from=str(base_model))
        variant = dataclasses.replace(variant, decoding=DecodingConfig.from_pipeline_config(base_pipe.config))
    sides = {}  # side runs beside the codec on the same GPU: name -> (config, process)
    if mode == "continue":
        side_runs = (  # name, recipe, crops per step, steps, LPIPS network (the decoder's: the one carried)
            ("encoder", ENCODER_RECIPE, args.encoder_batch, args.encoder_steps, None),
            ("decoder", DECODER_RECIPES[args.decoder_recipe], args.decoder_batch, args.decoder_steps, cfg.losses.lpips_net))
        for name, recipe, batch, steps, lpips_net in side_runs:
            if batch > 0:
                side = side_config(name, recipe, folders, work, base_model, batch, steps, None if dry else minutes, lpips_net)
                sides[name] = (side, train(side, work, name, args.device))
        if args.decoder_batch > 0:
            summary["decoder_recipe"] = args.decoder_recipe
    if not succeeded(train(variant, work, "final", args.device), work, "final"):
        summary["final_failed"] = True  # ship what the earlier stage saved, if anything
    for name, (side, proc) in sides.items():  # each returns its autoencoder folder as NAME-vae.tar
        summary[f"{name}_failed"] = not succeeded(proc, work, name)
        summary[f"{name}_val"] = last_val(Path(side.output_dir), name)
        summary[f"{name}_steps_per_second"] = steps_per_second(Path(side.output_dir), name)
        vae = Path(side.output_dir) / "stages" / f"0-{name}" / "out" / "vae"
        if vae.is_dir():  # TAEF2-family autoencoder with the student; scripts/swap_decoder.py puts a decoder into a model
            with tarfile.open(out / f"{name}-vae.tar", "w") as t:
                t.add(vae, arcname="vae")
    if not (run / "model").is_dir():
        return 1
    summary["final_val"] = last_val(run)
    summary["steps_per_second"] = steps_per_second(run)
    summary["parts"] = ship(run / "model", out, work)
    summary["minutes"] = round((time.time() - t_start) / 60, 2)
    with tarfile.open(out / "logs.tar", "w") as t:
        for path in sorted(runs.glob("*/*.csv")) + sorted(work.glob("*.yaml")) + sorted(work.glob("*.log")):
            t.add(path, arcname=f"{path.parent.name}/{path.name}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
