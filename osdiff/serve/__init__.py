"""`osdiff serve`: a local comparison page (osdiff vs AVIF/WebP/JPEG at the same file size)
and the JSON API under it. Nothing uploaded is written to disk."""
from .app import create_app

__all__ = ["create_app"]
