"""Put the decoder trained by one run into the model of another (the same latent statistics; the
model keeps its own encoder: TAEF2's, or a student of it), e.g. when the decoder and the codec of
osdiff-tiny v2 train side by side:

    python scripts/swap_decoder.py ../runs/cpu2/codec/model ../runs/cpu2/decoder/stages/0-decoder/out/vae ../runs/cpu2/model

or TAEF2's own full decoder (the package's osdiff/weights/taef2) in place of a student (osdiff-tiny v3.1):

    python scripts/swap_decoder.py ../runs/v3/snapshots/model-562 taef2 ../runs/v3/snapshots/model-562-taef2dec
"""
import sys
from pathlib import Path

from osdiff.hub import WEIGHTS_DIR
from osdiff.models.taesd import TRUNK_LAYERS, TAESDAutoencoder
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
else:  # the donor's decoder (its shape and weights) behind this model's encoder
    donor = TAESDAutoencoder.from_pretrained(vae_dir)
    c = donor.config
    if not pipe.vae.same_latent_space(donor):
        sys.exit(f"{vae_dir}: other latent statistics than {model_dir}'s; its decoder would not match the codec")
    vae = pipe.vae.with_decoder(c.decoder_channels, c.decoder_blocks, c.get("decoder_trunk", False),
                                c.get("decoder_trunk_layers", TRUNK_LAYERS))
    vae.decoder.load_state_dict(donor.decoder.state_dict())
    vae = vae.to(pipe.vae.dtype)
pipe.vae = vae
pipe.register_modules(vae=vae)
pipe.save_pretrained(out_dir)
print(f"wrote {out_dir}")
