"""Attention kernels behind the engine's single attention call site, chosen by name (--attention).

Optional kernels (flash-attn, SageAttention) are imported only when chosen; masked calls (CFG pairs whose
prompts differ in length) fall back to PyTorch SDPA, the one kernel here that takes an arbitrary key mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qimg.nets import layers
from qimg.runtime.options import ATTENTION_BACKENDS as BACKENDS


def _sdpa_cudnn(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # cuDNN first (Hopper's fastest for bf16, head dim 128); the others stay allowed for masks and odd shapes.
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return layers.sdpa(q, k, v, mask)


def _flash_impl() -> layers.AttentionFn:
    try:  # FlashAttention-3 (Hopper) first, then FlashAttention-2
        from flash_attn_interface import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        try:
            from flash_attn import flash_attn_func  # type: ignore[import-not-found]
        except ImportError as e:
            raise ImportError("--attention flash needs the flash-attn package (pip install flash-attn)") from e

    def flash(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if mask is not None:
            return layers.sdpa(q, k, v, mask)
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # FA3 also returns the softmax LSE

    return flash


def _sage_impl() -> layers.AttentionFn:
    try:
        from sageattention import sageattn  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError("--attention sage needs the sageattention package (pip install sageattention)") from e

    def sage(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if mask is not None:
            return layers.sdpa(q, k, v, mask)
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    return sage


_IMPLS = {"sdpa": lambda: layers.sdpa, "cudnn": lambda: _sdpa_cudnn, "flash": _flash_impl, "sage": _sage_impl}


def resolve(name: str, device: torch.device) -> str:
    """The backend a name means on this device (`auto`: flash-attn when installed, else cuDNN SDPA on CUDA,
    else SDPA); raises ValueError for an unknown name and ImportError when an optional kernel is missing."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name != "auto":
        _IMPLS[name]()  # imports the optional package now, so a missing one fails before any loading
        return name
    if device.type != "cuda":
        return "sdpa"
    try:
        _flash_impl()
        return "flash"
    except ImportError:
        return "cudnn"


def use_attention(name: str, device: torch.device | str = "cpu") -> str:
    """Install the named attention kernel for the whole engine; returns the backend actually used."""
    chosen = resolve(name, torch.device(device))
    layers.set_attention_impl(_IMPLS[chosen]())
    return chosen
