"""Which CPU kernels torch runs, and pinning them so decoded pixels do not depend on the CPU.

torch picks its vectorised ATen kernels from `ATEN_CPU_CAPABILITY` and oneDNN its JIT kernels
up to `ONEDNN_MAX_CPU_ISA`, each once, at its first use (not at `import torch`); unset, both take
the CPU's widest ISA (AVX512 here, AVX2 elsewhere), and the float results differ. `pin("avx2")`
sets both to AVX2 on an x86 CPU with AVX2 (read from /proc/cpuinfo, so Linux only), so the
deterministic mode decodes the same pixels as on an AVX2-only CPU. It costs decode time on an
AVX512 CPU (+35 % median, +23 % min, for a 512x768 decode here: docs/bitstream.md), so it is not the default:
`OSDIFF_KERNELS=avx2` applies it at `import osdiff`, and `osdiff conformance` applies it itself.
A program whose torch ran an op before the pin keeps torch's choice; `state()` then says the pin
was not applied, and conformance judges pixels by PSNR.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from .errors import OSDiffError

PIN = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
PINNED_CAPABILITY = "AVX2"  # what torch.backends.cpu.get_cpu_capability() says once pinned
CHOICE = "OSDIFF_KERNELS"
_set_by_osdiff: dict[str, str] = {}
_asked = {"pin": False}  # True once pin("avx2") was asked for (and not undone)


def cpuinfo(field: str) -> str | None:
    """The first value of `field` ('flags', 'vendor_id', 'model name') in /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty elsewhere)."""
    return set((cpuinfo("flags") or "").split())


def cpu_vendor() -> str:
    """GenuineIntel, AuthenticAMD, ... (MKL chooses its code path by vendor and ISA)."""
    return cpuinfo("vendor_id") or platform.machine()


def can_pin() -> bool:
    """x86-64 with AVX2 and FMA (what ATen's AVX2 kernels need; forcing them elsewhere crashes)."""
    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= cpu_flags()


def pin(choice: str | None = None) -> None:
    """'avx2': set the variables in PIN (over the caller's values), before torch's first op;
    'native' or None (default: $OSDIFF_KERNELS, else native): leave torch's choice. A no-op where
    the CPU has no AVX2 (forcing ATen's AVX2 kernels there would crash)."""
    choice = (choice or os.environ.get(CHOICE) or "native").lower()
    if choice not in ("avx2", "native"):
        raise OSDiffError(f"{CHOICE}={choice!r}: expected avx2 or native")
    _asked["pin"] = choice == "avx2"
    if choice == "native" or not can_pin():
        return
    for name, value in PIN.items():
        if os.environ.get(name) != value:
            _set_by_osdiff.setdefault(name, os.environ.get(name, ""))
            os.environ[name] = value
    if "torch" in sys.modules and _set_by_osdiff and capability() != PINNED_CAPABILITY:
        unpin()  # torch already chose its kernels: keep oneDNN's choice consistent with ATen's
        _asked["pin"] = True


def unpin() -> None:
    """Undo what `pin()` set (before torch's first op, torch then picks the CPU's widest ISA)."""
    _asked["pin"] = False
    for name, before in _set_by_osdiff.items():
        if before:
            os.environ[name] = before
        else:
            os.environ.pop(name, None)
    _set_by_osdiff.clear()


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # Linux names of x86's bfloat16 multiply instructions
ONEDNN_BF16_ISAS = ("BF16", "FP16", "AMX", "ALL")  # ONEDNN_MAX_CPU_ISA caps that still reach them


def native_bf16() -> bool:
    """Whether oneDNN multiplies bfloat16 in hardware here: an x86 CPU with AMX-BF16 or
    AVX512-BF16 (/proc/cpuinfo, so Linux only) and no ONEDNN_MAX_CPU_ISA cap below them (the
    AVX2 pin is one). Elsewhere torch emulates bfloat16, slower than float32."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return bool(set(BF16_FLAGS) & cpu_flags()) and any(name in isa for name in ONEDNN_BF16_ISAS)


def capability() -> str:
    """The ATen kernels in force (AVX512, AVX2, DEFAULT, ...); asking fixes them for the process."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def state() -> str:
    """One phrase on the pin, for people: 'AVX2 (pinned)', 'AVX512 (pin not applied: ...)', ..."""
    here = capability()
    if here == PINNED_CAPABILITY and os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2":
        return f"{here} (pinned)"
    if not can_pin():
        return f"{here} (no pin: not an x86 CPU with AVX2)"
    if _asked["pin"]:
        return f"{here} (pin not applied: torch chose its kernels before the pin)"
    return f"{here} (not pinned)"


def in_force() -> dict[str, str]:
    """What selects the CPU kernels: ATen's capability, oneDNN's ISA cap, the BLAS and its vendor."""
    import torch

    blas = f"mkl {cpu_vendor()}" if torch.backends.mkl.is_available() else "other"
    if os.environ.get("MKL_CBWR"):
        blas += f" MKL_CBWR={os.environ['MKL_CBWR']}"
    return {"cpu_capability": capability(), "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native").upper(),
            "blas": blas}


__all__ = ["PIN", "PINNED_CAPABILITY", "can_pin", "capability", "in_force", "native_bf16", "pin", "state", "unpin"]
