"""FP8 linears swapped in after loading: e4m3 weights with one scale per output channel, used two ways.

- compute: activations quantised per token (dynamic scale) and multiplied on the FP8 tensor cores through
  torch._scaled_mm with row-wise scales (Hopper / Ada); output and bias in bf16.
- weights: FP8 storage only; each layer upcasts its weight to the compute dtype just before its matmul (and, when
  training through it, again in backward: only the e4m3 weight is kept for the gradient).

Which linears are swapped is a predicate over module names, given by the model's family record
(qimg/families/): families keep every layer that users' black or NaN images come from in bf16 (modulation,
embeddings, norms, input and output projections).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.nets.layers import FeedForward

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
FAST_ACCUM_MIN_ROWS = 128  # FP8 matmuls of fewer rows accumulate with periodic promotion (forward_quantized)
Predicate = Callable[[str, nn.Linear], bool]
# qimg.runtime.triton_kernels once qimg.runtime.kernels switches the fused kernels on (CUDA with Triton)
_fused: Any = None


def set_fused_kernels(kernels: Any) -> None:
    """The fused-kernel module FP8 linears use on CUDA (dequantisation, GELU + quantisation), or None."""
    global _fused
    _fused = kernels


def quantize_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) -> (e4m3 values, fp32 scales (M, 1)) with x ~= values * scales; the scale maps each row's absmax
    to the e4m3 maximum (a zero row gets scale 1 instead of dividing by zero)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_supported(device: torch.device | str) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """A linear with e4m3 weights (per-output-channel scales) that computes in FP8 or only stores in FP8."""

    def __init__(self, linear: nn.Linear, compute: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute = compute
        self.out_dtype = linear.weight.dtype
        weight = linear.weight.detach()
        if _fused is not None and weight.is_cuda and weight.dim() == 2:
            w, scale = _fused.quantize_rows(weight)  # one launch where quantize_rowwise makes eight torch calls
        else:
            w, scale = quantize_rowwise(weight)
        self.register_buffer("weight_fp8", w)  # (N, K)
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # (1, N), fp32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        # e4m3 -> bf16 is exact; scaling in the compute dtype adds a rounding of 2^-9 at most (e4m3 itself: 2^-4)
        # and reads/writes 7 bytes per weight instead of 19 through fp32 (measured: ~100 ms per CFG step, eager).
        # The fused kernel gives the same values in one pass: 3 bytes per weight.
        if _fused is not None and self.weight_fp8.is_cuda and dtype in (torch.bfloat16, torch.float16):
            return _fused.dequantize_rows(self.weight_fp8, self.weight_scale, dtype)
        return _dequantize(self.weight_fp8, self.weight_scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.compute or x.device.type != "cuda":
            # Storage mode, and CPU runs (no FP8 matmul there): upcast the weight; compute mode on CPU also
            # quantises the activations so tests see the same rounding as the GPU path.
            if self.compute:
                q, s = quantize_rowwise(x.reshape(-1, self.in_features))
                x = (q.float() * s).to(x.dtype).reshape(x.shape)
            if x.requires_grad and torch.is_grad_enabled():
                return _DequantizingLinear.apply(x, self.weight_fp8, self.weight_scale, self.bias)
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        rows = x.reshape(-1, self.in_features)
        if _fused is not None and not torch.compiler.is_compiling():
            # Eager: one launch, where quantize_rowwise makes eight torch calls (0.8 s of an 8-step uncompiled run's
            # main thread on an H200 host). Compiled, inductor fuses quantize_rowwise into the op that feeds it.
            q, s = _fused.quantize_rows(rows)
        else:
            q, s = quantize_rowwise(rows)
        return self.forward_quantized(q, s, x.shape[:-1])

    def forward_quantized(self, q: Tensor, s: Tensor, lead: torch.Size | tuple[int, ...]) -> Tensor:
        """The FP8 matmul of activations quantised elsewhere: q (M, K) e4m3, s (M, 1) fp32 row scales.

        Fast accumulation (Hopper's FP8 accumulator without periodic promotion to fp32): 6-20% faster on the
        block's image-token shapes (bench/results/gemm_shapes_h200.json), and its error (relative L2 0.03752
        against 0.03750 without, both from e4m3 rounding) is lost in the quantisation's. Only from
        FAST_ACCUM_MIN_ROWS rows: cuBLASLt (torch 2.11, CUDA 13, H200) has no algorithm for fast accumulation with
        a bias at K = 12288 or 15360 and at most 42 rows (a short prompt's text stream without CFG failed with
        CUBLAS_STATUS_NOT_SUPPORTED), and so few rows are bound by reading the weights, where it gains nothing."""
        # a branch, not bool(): compiled with a dynamic row count, dynamo guards on a branch but keeps bool() symbolic,
        # which _scaled_mm refuses
        fast = True if q.shape[0] >= FAST_ACCUM_MIN_ROWS else False  # noqa: SIM210
        out = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=s, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=self.out_dtype, use_fast_accum=fast)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        mode = "compute" if self.compute else "weights"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={mode}"


class _DequantizingLinear(torch.autograd.Function):
    """y = x W^T + b with W upcast from e4m3 for the matmul, keeping only the e4m3 weight for backward: autograd
    through F.linear would save the upcast weight (as many bytes as the bf16 model, per block, until its
    backward runs). Backward upcasts it again and returns the input's gradient only: the base stays frozen."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor, scale: Tensor,
                bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight, scale)
        ctx.dtype = x.dtype  # type: ignore[attr-defined]
        return F.linear(x, _dequantize(weight, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, scale = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad @ _dequantize(weight, scale, ctx.dtype), None, None, None  # type: ignore[attr-defined]


def _dequantize(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return weight.to(dtype) * scale.t().to(dtype)


def apply_fp8(model: nn.Module, predicate: Predicate, *, compute: bool) -> int:
    """Replace every nn.Linear the predicate selects with an FP8Linear (freeing its bf16 weight); returns the count."""
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and predicate(name, m)]
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear(linear, compute))
        del linear
    if compute:
        for module in model.modules():
            if isinstance(module, FeedForward):
                module.forward = types.MethodType(_fp8_mlp_forward, module)  # type: ignore[method-assign]
    return len(chosen)


def _fp8_mlp_forward(ff: FeedForward, x: Tensor) -> Tensor:
    """FeedForward.forward with GELU and the hidden activation's quantisation fused, when both linears are FP8
    compute on CUDA with the fused kernels on; the plain path otherwise (a LoRA wrapper on either, CPU runs)."""
    up, down = ff.net[0].proj, ff.net[2]
    if (_fused is None or not x.is_cuda or type(up) is not FP8Linear or type(down) is not FP8Linear
            or not (up.compute and down.compute)):
        return down(ff.net[0](x))
    h = up(x)
    q, s = _fused.gelu_quant(h.reshape(-1, h.shape[-1]))
    return down.forward_quantized(q, s, h.shape[:-1])
