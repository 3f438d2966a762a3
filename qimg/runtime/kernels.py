"""Fused GPU kernels (Triton: qimg/runtime/triton_kernels.py), switched on from outside the nets like the
attention kernel: process-wide, for CUDA devices, where Triton is installed.

What they replace, and why (bench/results/profile_*.json name the kernels they displace):
- q/k RMSNorm + joining the text and image streams + RoPE (nets.layers.norm_rope): one pass over q and k instead
  of a norm kernel, a concatenation and a rotation kernel;
- the MLPs' GELU (nets.layers.linear_gelu) inside the up projection's cuBLASLt matmul (its epilogue), instead of a
  pass over the 4x-wide hidden activation;
- FP8 compute: GELU + per-token quantisation of the MLP's hidden activation in one pass (inductor emits a looped
  two-pass reduction over the 12288-wide rows), and --fp8 weights' dequantisation in one pass.
Each falls back to the PyTorch form for what it does not cover (CPU tensors, fp32, gradients, other norms), so
numerics elsewhere are unchanged. QIMG_FUSED_KERNELS=0 turns them off (to compare, or to rule them out).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor, nn

from qimg.nets import layers
from qimg.runtime import fp8

_kernels: ModuleType | None = None


def fused_kernels_available(device: torch.device | str) -> bool:
    """A CUDA device, Triton importable, and not turned off with QIMG_FUSED_KERNELS=0."""
    return (torch.device(device).type == "cuda" and os.environ.get("QIMG_FUSED_KERNELS", "1") != "0"
            and importlib.util.find_spec("triton") is not None)


def use_fused_kernels(device: torch.device | str) -> bool:
    """Switch the fused kernels on for `device` where available (off otherwise); returns whether they are on."""
    global _kernels
    if not fused_kernels_available(device):
        layers.set_norm_rope_impl(None)
        layers.set_linear_gelu_impl(None)
        fp8.set_fused_kernels(None)
        return False
    if _kernels is None:
        from qimg.runtime import triton_kernels  # registers the qimg:: ops

        _kernels = triton_kernels
    layers.set_norm_rope_impl(_norm_rope_fused)
    layers.set_linear_gelu_impl(_linear_gelu_fused)
    fp8.set_fused_kernels(_kernels)
    return True


@contextlib.contextmanager
def pytorch_forms() -> Iterator[None]:
    """Every fused call site in its PyTorch form for the duration (process-wide; the kernels in use come back
    after). A compiled block package (runtime/packaged.py) is traced this way: its graph then holds no qimg op,
    which AOTInductor would call back through Python, and refuses to for the ops' dtype arguments ("expected
    ... as_scalar_type ... got as_int", torch 2.11 and 2.13); inductor fuses those forms itself about as well
    (bench/results/fusions_h200.json)."""
    norm_rope = layers.set_norm_rope_impl(None)
    linear_gelu = layers.set_linear_gelu_impl(None)
    fused = fp8._fused
    fp8.set_fused_kernels(None)
    try:
        yield
    finally:
        layers.set_norm_rope_impl(norm_rope)
        layers.set_linear_gelu_impl(linear_gelu)
        fp8.set_fused_kernels(fused)


def _linear_gelu_fused(linear: nn.Module, x: Tensor) -> Tensor:
    # cuBLASLt's GELU epilogue is the tanh form (bench/results/fusions_*.json checks it against both), applied to
    # the fp32 accumulator: one rounding where the PyTorch form rounds the matmul's output and then the GELU's
    if (type(linear) is not nn.Linear or linear.bias is None or not x.is_cuda
            or x.dtype not in (torch.bfloat16, torch.float16) or linear.weight.dtype != x.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))):
        return layers._linear_gelu_torch(linear, x)
    out = _kernels.linear_gelu(x.reshape(-1, x.shape[-1]), linear.weight, linear.bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _eps(norm: nn.Module, x: Tensor) -> float | None:
    """The epsilon of a plain RMSNorm over the head dimension with a weight in x's dtype; None for anything else."""
    weight = getattr(norm, "weight", None)
    if not isinstance(norm, (layers.RMSNorm, nn.RMSNorm)) or weight is None or weight.dtype != x.dtype:
        return None
    eps = norm.eps
    return torch.finfo(x.dtype).eps if eps is None else float(eps)


def _norm_rope_fused(t: Tensor | None, t_norm: nn.Module | None, i: Tensor, i_norm: nn.Module, rope: Tensor
                     ) -> Tensor:
    eps = _eps(i_norm, i)
    t_eps = eps if t is None or t_norm is None else _eps(t_norm, t)
    grads = torch.is_grad_enabled() and any(
        p.requires_grad for p in (i, t, i_norm.weight, getattr(t_norm, "weight", None)) if p is not None)
    if (not i.is_cuda or i.dtype not in (torch.bfloat16, torch.float16) or eps is None or t_eps != eps or grads
            or i.shape[-1] % 2 or (t is not None and t.dtype != i.dtype)):
        return layers._norm_rope_torch(t, t_norm, i, i_norm, rope)
    if t is None or t_norm is None:
        t, t_norm = i[:, :0], i_norm
    return _kernels.qk_norm_rope(t, t_norm.weight, i, i_norm.weight, rope, eps)
