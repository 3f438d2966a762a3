"""Device and dtype choice, shared by every pipeline and by the VAE round trip."""

from __future__ import annotations

import torch

from qimg.errors import InputError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or cuda when present, else cpu; a missing GPU is a clear error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA GPU is visible", hint="use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU unless asked otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cuda_index(device: torch.device) -> int:
    """The CUDA device number ("cuda" alone means the current device; some torch.cuda calls need the number)."""
    return torch.cuda.current_device() if device.index is None else device.index
