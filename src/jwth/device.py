"""Device and numeric-precision choice, with a clean CPU fallback."""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto|cpu|cuda|cuda:N`` to a torch device.

    ``auto`` picks CUDA when available, else CPU. Asking for CUDA where there is none
    raises RuntimeError with the fix (``--device cpu``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"Device {name!r} requested but CUDA is not available; use --device cpu.")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in checks:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - platform specific
            pass
    return False


def resolve_precision(device: torch.device, precision: Precision = "auto") -> torch.dtype:
    """Return the autocast dtype: bf16 where it is faster, fp32 otherwise.

    ``auto``: bf16 on CUDA with bf16 support, bf16 on CPUs with native bf16 units,
    fp32 elsewhere. ``fp16`` is only allowed on CUDA (ValueError otherwise).
    """
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 autocast is only supported on CUDA; use bf16 or fp32 on CPU.")
        return torch.float16
    if precision != "auto":
        raise ValueError(f"Unknown precision {precision!r}; choose auto, fp32, bf16 or fp16.")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: Precision = "auto") -> Iterator[torch.dtype]:
    """Autocast context for inference/training; yields the dtype in use."""
    device = torch.device(device) if isinstance(device, str) else device
    dtype = resolve_precision(device, precision)
    if dtype == torch.float32:
        yield dtype
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield dtype
