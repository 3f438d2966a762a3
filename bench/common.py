"""Helpers every benchmark here shares: timing with device events and the random full-size Qwen MMDiT."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def time_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Milliseconds per call after warm-up: CUDA events on a GPU (device work is asynchronous), else a host clock."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return times


def random_diffusers_mmdit(layers: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Any:
    """diffusers' QwenImageTransformer2DModel at full width, built directly in `dtype` on `device` (20B params in
    fp32 would not fit beside anything), every parameter random (diffusers zero-initialises some layers)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = QwenImageTransformer2DModel(num_layers=layers)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def sharing_qimg_mmdit(ref: Any, layers: int) -> Any:
    """qimg's QwenMMDiT on the very same weight tensors as `ref` (built on meta, parameters assigned)."""
    from qimg.nets.qwen_mmdit import QwenMMDiT
    from qimg.specs import QwenMMDiTParams

    with torch.device("meta"):
        ours = QwenMMDiT(QwenMMDiTParams(num_layers=layers))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval().requires_grad_(False)


def fp8_compute_copy(model: Any) -> Any:
    """A QwenMMDiT with FP8 compute linears built from `model`'s tensors (the bf16 ones it replaces are freed once
    the caller drops its own references to `model`)."""
    from qimg.families.qwen import mmdit_fp8_layers
    from qimg.nets.qwen_mmdit import QwenMMDiT
    from qimg.runtime.fp8 import apply_fp8

    with torch.device("meta"):
        fresh = QwenMMDiT(model.params)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh = fresh.eval().requires_grad_(False)
    apply_fp8(fresh, mmdit_fp8_layers, compute=True)
    return fresh
