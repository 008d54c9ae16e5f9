"""Entropy-coded payload and the `.osd` container around it."""
from .bitstream import FORMAT_VERSION, MAGIC, OSDHeader, pack, parse

__all__ = ["MAGIC", "FORMAT_VERSION", "OSDHeader", "pack", "parse"]
