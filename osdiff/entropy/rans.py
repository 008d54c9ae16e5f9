"""Guarding compressai's rANS decoder against reading past its input."""
from __future__ import annotations


def pad_for_rans(string: bytes, symbols: int) -> bytes:
    """`string` followed by enough zero bytes that compressai's rANS decoder, which reads
    32-bit words without bounds checks, stays inside the buffer even on garbage input.

    Past the real data the decoder reads zeros: each symbol then reads at most one word (4 bytes)
    once the state's leftover bits are flushed (a few hundred bytes at most), and the bypass
    escape of a symbol can read at most 15 nibbles for every nibble of the string
    (`n_bypass` grows by at most 15 per nibble): 16 * len + 4 * symbols + 64 KiB covers it."""
    return string + bytes(16 * len(string) + 4 * symbols + 65536)
