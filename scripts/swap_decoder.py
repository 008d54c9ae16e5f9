"""Put the decoder trained by one run into the model of another (same frozen TAEF2 encoder and
latent statistics), e.g. when the decoder and the codec of osdiff-tiny v2 train side by side:

    python scripts/swap_decoder.py ../runs/cpu2/codec/model ../runs/cpu2/decoder/stages/0-decoder/out/vae ../runs/cpu2/model

or TAEF2's own full decoder (the package's osdiff/weights/taef2) in place of a student (osdiff-tiny v3.1):

    python scripts/swap_decoder.py ../runs/v3/snapshots/model-562 taef2 ../runs/v3/snapshots/model-562-taef2dec
"""
import sys
from pathlib import Path

import torch

from osdiff.hub import WEIGHTS_DIR
from osdiff.models.taesd import TAESDAutoencoder
from osdiff.pipeline import OSDiffPipeline

if len(sys.argv) != 4:
    sys.exit(__doc__)
model_dir, vae_dir, out_dir = (Path(a) for a in sys.argv[1:])
if out_dir.exists():
    sys.exit(f"{out_dir} exists; not overwriting it")
pipe = OSDiffPipeline.from_pretrained(model_dir)
if not isinstance(pipe.vae, TAESDAutoencoder):
    sys.exit(f"{model_dir}: its autoencoder is not a TAEF2 one")
if str(vae_dir) == "taef2":  # the teacher's decoder, with this model's encoder and latent statistics
    teacher = TAESDAutoencoder.from_pretrained(WEIGHTS_DIR / "taef2" / "vae")
    vae = pipe.vae.with_decoder(None)
    vae.decoder.load_state_dict(teacher.decoder.state_dict())
    vae = vae.to(pipe.vae.dtype)
else:
    vae = TAESDAutoencoder.from_pretrained(vae_dir).to(pipe.vae.dtype)
same_encoder = all(torch.equal(a, b) for a, b in zip(pipe.vae.encoder.state_dict().values(), vae.encoder.state_dict().values()))
same_stats = pipe.vae.config.latent_mean == vae.config.latent_mean and pipe.vae.config.latent_std == vae.config.latent_std
if not (same_encoder and same_stats):
    sys.exit(f"{vae_dir}: another encoder or other latent statistics than {model_dir}'s; the codec would not match it")
pipe.vae = vae
pipe.register_modules(vae=vae)
pipe.save_pretrained(out_dir)
print(f"wrote {out_dir}")
