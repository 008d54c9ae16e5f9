"""Model components: latent autoencoder, latent compressor, conditioning, controlled UNet."""
from .autoencoder import TinyAutoencoder, decode_latent, encode_latent
from .compressor import LatentCompressor
from .conditioning import ConditioningEmbedding

__all__ = ["TinyAutoencoder", "LatentCompressor", "ConditioningEmbedding", "encode_latent", "decode_latent"]
