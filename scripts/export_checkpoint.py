"""Make a model folder from a running codec or decoder stage's checkpoint, to evaluate it
mid-training: the parts the checkpoint holds (compressor and controlled UNet of a codec stage,
the vae of a decoder stage), every other part from the model folder the run started from (its
init_from), and the run's decoding settings (timestep, start, noise seed, control scale) when it
trained the UNet. A checkpoint with more quality levels than that model
(configs/tiny-v2-cpu-levels.yaml) gets them as new lowest levels, as the run did.

    python scripts/export_checkpoint.py ../runs/gpu1/model ../runs/cpu2/control/stages/0-codec/ckpt.pt ../runs/cpu2/eval-model
"""
import sys
from pathlib import Path

import torch

from osdiff.config import DecodingConfig
from osdiff.pipeline import OSDiffPipeline

if len(sys.argv) != 4:
    sys.exit(__doc__)
base, ckpt, out = (Path(a) for a in sys.argv[1:])
if out.exists():
    sys.exit(f"{out} exists; not overwriting it")
pipe = OSDiffPipeline.from_pretrained(base).to(torch.float32)
state = torch.load(ckpt, map_location="cpu", weights_only=False)
modules = state["modules"]
if "compressor" in modules:
    extra = modules["compressor"]["y_gain"].shape[0] - pipe.compressor.config.num_quality_levels
    if extra > 0:
        pipe.register_modules(compressor=pipe.compressor.with_lower_levels(extra))
    pipe.compressor.load_state_dict(modules["compressor"])
    pipe.compressor.update(force=True)
for name in ("unet", "vae"):
    if name in modules:
        getattr(pipe, name).load_state_dict(modules[name])
if "unet" in modules:  # the UNet learned for the run's decoding procedure (e.g. its timestep), not the base's
    pipe.register_to_config(**DecodingConfig(**state["config"]["decoding"]).pipeline_config())
pipe.save_pretrained(out)
print(f"wrote {out} (step {state['step']})")
