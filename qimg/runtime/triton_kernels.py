"""Fused Triton kernels for the diffusion transformer's blocks, registered as torch ops (qimg::<name>).

Each block spends most of its non-matmul time streaming activations through memory: LayerNorm, adaLN modulation,
the FP8 quantisation of the next linear's input, the QK RMSNorm and RoPE are each a pass (or several) over the
tokens in eager mode. These kernels do each chain in one pass, one program per token row (qk_norm_rope: per
eight heads of a token):

- gelu_quant: tanh-GELU of the MLP's hidden activations and their per-row e4m3 quantisation (the down-projection's
  input).
- norm_modulate: LayerNorm without affine, adaLN modulation x * (1 + scale) + shift, and optionally the per-row
  quantisation of the result (the input of the attention or MLP projections).
- qk_norm_rope: the per-head RMSNorm of q or k for both streams, their concatenation along the sequence, and RoPE.
- dequantize_rows: an FP8 weight times its per-row scales (--fp8 weights), one pass.
- quantize_rows: per-row e4m3 quantisation of a weight as it loads, one pass.
- linear_gelu (not Triton): the up projection with tanh-GELU in cuBLASLt's epilogue, kept opaque to the compiler.

qimg/runtime/kernels.py wires in all but norm_modulate, which is measured (bench/fusions.py) but not used: inductor's
own fusion under torch.compile is as fast (0.034 against 0.036 ms on an H200, device time) and also takes in the
residual add before it.

The kernels reproduce eager PyTorch's roundings step by step (every intermediate that eager rounds to bf16 is
rounded here too), so they agree with the eager paths up to rare one-ulp differences from fp32 reductions and
transcendentals; the quantising ones multiply by 1 / scale where eager divides (_quantize says what that costs).
The ops have fake implementations, so they trace under torch.compile(fullgraph=True). They run on the tensors'
device: CUDA, or the CPU under Triton's interpreter (TRITON_INTERPRET=1, as the tests run them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

E4M3_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn; quantised outputs are clamped to it whatever their dtype
# fp32(1 / 448). On CUDA, PyTorch divides by a Python scalar as a multiply by the scalar's fp32 reciprocal, so
# quantize_rowwise's `amax / 448.0` is amax * E4M3_RECIP on the GPU (the CPU divides, up to an ulp apart).
E4M3_RECIP = tl.constexpr(0.0022321429569274187)


# The ops' library. Defined through torch.library.Library rather than torch.library.custom_op: a custom_op's Python
# kernel imports torch._dynamo on its first dispatched call (seconds), and a call through torch.ops.qimg outside
# torch.compile should not cost that. (Compiled block packages do not call them: runtime/kernels.pytorch_forms.)
_LIB = torch.library.Library("qimg", "DEF")


class _Op:
    """A kernel's launcher that torch.compile and torch.export see as the opaque op qimg::<name> (with a fake
    implementation for shapes, from `register_fake`) and eager code calls directly: through the op, every eager
    call would pay torch's Python dispatch."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        _LIB.define(fn.__name__ + torch.library.infer_schema(fn, mutates_args=()))
        _LIB.impl(fn.__name__, fn, "CompositeExplicitAutograd")
        self.op = getattr(torch.ops.qimg, fn.__name__).default  # what dynamo and export put in the graph
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.op(*args, **kwargs)
        return self.fn(*args, **kwargs)

    def register_fake(self, fake: Callable[..., Any]) -> Callable[..., Any]:
        return torch.library.register_fake(f"qimg::{self.fn.__name__}", fake, lib=_LIB)


# How the kernels round; on the GPU both settings of hw_casts give the same values (bench/fusions.py times them).
# hw_casts: the GPU's cvt.rn casts, or rounding by hand on the bits (Triton's interpreter truncates casts, so
# interpreted kernels always take the hand form); None: the GPU's unless interpreted. exact_division: y / scale
# as eager PyTorch divides (div.rn), or y times 1 / scale (rarely an e4m3 step apart: see _quantize).
hw_casts: bool | None = None
exact_division = False


def _modes() -> dict[str, bool]:
    interpreted = type(_quant_rows_kernel).__name__ == "InterpretedFunction"
    return {"HW": not interpreted if hw_casts is None else hw_casts and not interpreted, "DIV_RN": exact_division}


def _launch_params(width: int) -> tuple[int, int]:
    """One row per program: a block covering the row, with enough warps to keep registers per thread low."""
    block = triton.next_power_of_2(width)
    return block, min(16, max(4, block // 512))


# Reductions through tl.reduce and these instead of tl.sum and tl.max: those are @jit functions of triton.language,
# which run under the interpreter only if TRITON_INTERPRET was set before triton itself was first imported;
# builtins and this module's functions only need it set before this module is imported (as the tests do).
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _cast(x, dtype: tl.constexpr, HW: tl.constexpr):
    # HW: the GPU's own cast, one cvt.rn instruction. Otherwise fp32 -> bf16 by hand (round to nearest even on the
    # bits), which gives the same values: Triton's interpreter truncates that cast, so CPU tests run this form and
    # check the GPU's arithmetic. fp16 and fp32 casts are right in both; e4m3 likewise (_round_e4m3).
    if dtype == tl.bfloat16 and not HW:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(dtype)


@triton.jit
def _round_e4m3(q, HW: tl.constexpr):
    # Round to nearest even onto e4m3's grid (3 mantissa bits; steps of 2^-9 below 2^-6) by hand, |q| <= 448:
    # Triton's interpreter truncates fp32 -> e4m3 casts. The cast of the result is then exact on every backend,
    # so CPU tests check the e4m3 values the GPU stores (a few integer ops; the kernels are memory-bound).
    if HW:  # cvt.rn.satfinite: the same rounding in one instruction
        return q
    bits = q.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    mag = bits ^ sign
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0xFFF00000
    a = mag.to(tl.float32, bitcast=True)
    subnormal = ((a + 24576.0) - 24576.0).to(tl.uint32, bitcast=True)  # fp32 spacing in [2^14, 2^15) is 2^-9
    return (tl.where(a < 0.015625, subnormal, normal) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round(x, dtype: tl.constexpr, HW: tl.constexpr):
    """The fp32 value that eager PyTorch would hold after storing x in dtype (a no-op for fp32)."""
    return _cast(x, dtype, HW).to(tl.float32)


@triton.jit
def _quantize(y, scale, HW: tl.constexpr, DIV_RN: tl.constexpr):
    # qimg.runtime.fp8.quantize_rowwise's scaling and clamp, before the cast. DIV_RN: the division as eager
    # PyTorch does it (div.rn); else y times 1 / scale, which puts ~0.2% of the values of a row of bf16 values an
    # e4m3 step from eager's (those within an fp32 ulp of a rounding midpoint): a third of gelu_quant's time
    # (bench/results/fusions_graph_h200.json), for a difference far inside the quantisation's own error.
    if DIV_RN:
        q = tl.math.div_rn(y, scale)
    else:
        q = y * (1.0 / scale)
    return tl.minimum(tl.maximum(q, -E4M3_MAX), E4M3_MAX)


@triton.jit
def _store_quantized(q, ptr, cols, mask, HW: tl.constexpr):
    if ptr.dtype.element_ty == tl.float8e4nv:
        q = _round_e4m3(q, HW)
    tl.store(ptr + cols, q.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_store(y, mask, q_ptr, s_ptr, row, HW: tl.constexpr, DIV_RN: tl.constexpr):
    # y: a whole row, in registers
    amax = tl.reduce(tl.where(mask, tl.abs(y), 0.0), 0, _max)
    scale = tl.where(amax > 0, amax * E4M3_RECIP, 1.0)
    _store_quantized(_quantize(y, scale, HW, DIV_RN), q_ptr, tl.arange(0, y.shape[0]), mask, HW)
    tl.store(s_ptr + row, scale)


@triton.jit
def _gelu(x, dtype: tl.constexpr, HW: tl.constexpr):
    u = 0.7978845608028654 * (x + 0.044715 * (x * x * x))  # PyTorch's operation order
    # |tanh(u)| = 1 - 2e / (1 + e) with e = exp(-2|u|) (never overflows: no inf, no interpreter warnings), rounded
    # once like a library tanh. Then 1 + tanh(u) as eager computes it, though x * sigmoid(2u) is more accurate:
    # eager's cancellation there decides GELU's values below x = -3 or so (zero below -5.5) and they are matched.
    e = tl.exp(-2.0 * tl.abs(u))
    th = 1.0 - 2.0 * e / (1.0 + e)
    return _round(0.5 * x * (1.0 + tl.where(u >= 0, th, -th)), dtype, HW)


@triton.jit
def _norm_modulate_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr, s_ptr, L, K,
    sx_b, sx_l, ssh_b, ssh_l, ssc_b, ssc_l, eps,
    QUANT: tl.constexpr, BLOCK: tl.constexpr, HW: tl.constexpr, DIV_RN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, tok = row // L, row % L
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    dt = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + b * sx_b + tok * sx_l + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.reduce(x, 0, _add) / K
    d = tl.where(mask, x - mean, 0.0)  # two-pass variance: the row is in registers anyway
    n = _round(d * tl.math.rsqrt(tl.reduce(d * d, 0, _add) / K + eps), dt, HW)
    shift = tl.load(shift_ptr + b * ssh_b + tok * ssh_l + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * ssc_b + tok * ssc_l + cols, mask=mask, other=0.0).to(tl.float32)
    # eager bf16 rounds 1 + scale, the product and the sum separately
    y = _round(_round(n * _round(1.0 + scale, dt, HW), dt, HW) + shift, dt, HW)
    if QUANT:
        _quantize_store(y, mask, out_ptr + row * K, s_ptr, row, HW, DIV_RN)
    else:
        tl.store(out_ptr + row * K + cols, _cast(y, out_ptr.dtype.element_ty, HW), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    x_ptr, w_ptr, rope_ptr, out_ptr, Lx, l0, L, H, D,
    sx_b, sx_l, sx_h, s_rope, eps,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, tok = row // Lx, row % Lx
    # A program takes BLOCK_H heads of one token as a flat (BLOCK_H, D) tile: small enough for many programs per
    # multiprocessor (a whole token's 24 x 128 in one tile ran at a fifth of the memory's speed on an H200). RoPE
    # mixes each channel with its pair partner (x[2k] with x[2k+1]): a second load of the same row at channel
    # d ^ 1 (the same cache lines) gives every lane its partner, so nothing is split, joined or shuffled.
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    partner = d ^ 1
    mask = (heads < H) & (d < D)
    src = x_ptr + b * sx_b + tok * sx_l + heads * sx_h
    x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32)
    r = tl.math.rsqrt(tl.reduce(x * x, 1, _add) / D + eps)[:, None]
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + partner, mask=d < D, other=0.0).to(tl.float32)
    pair = rope_ptr + (l0 + tok) * s_rope + (d - d % 2)  # (cos, sin) of pair d // 2, side by side
    cos = tl.load(pair, mask=d < D, other=0.0)
    sin = tl.load(pair + 1, mask=d < D, other=0.0)
    # RMSNorm's roundings: x * rsqrt stays fp32, then to the weight's dtype, the weight product in it, then x's
    wdt = w_ptr.dtype.element_ty  # one per line: a tuple of dtypes does not compile
    xdt = x_ptr.dtype.element_ty
    n = _round(_round(_round(x * r, wdt, HW) * w, wdt, HW), xdt, HW)
    npair = _round(_round(_round(xp * r, wdt, HW) * wp, wdt, HW), xdt, HW)
    # even d = 2k: x[2k] cos - x[2k+1] sin; odd d = 2k+1: x[2k] sin + x[2k+1] cos (apply_rope's operation order)
    y = tl.where(d % 2 == 0, n * cos - npair * sin, npair * sin + n * cos)
    dst = out_ptr + ((b * L + l0 + tok) * H + heads) * D + d
    tl.store(dst, _cast(y, out_ptr.dtype.element_ty, HW), mask=mask)


@_Op
def gelu_quant(h: Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """tanh-GELU of h (M, K) then per-row quantisation: (values (M, K) in out_dtype, fp32 scales (M, 1))."""
    return _rowwise("gelu_quant", h, out_dtype, gelu=True)


def _rowwise(name: str, x: Tensor, out_dtype: torch.dtype, gelu: bool) -> tuple[Tensor, Tensor]:
    """Quantise (M, K) rows, after tanh-GELU if asked, one row per program: (values (M, K) in out_dtype, fp32
    scales (M, 1))."""
    if x.dim() != 2:
        raise ValueError(f"{name} expects x of shape (M, K), got {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=out_dtype, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M and K:
        block, warps = _launch_params(K)
        _quant_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block, num_warps=warps, GELU=gelu,
                                 **_modes())
    return q, s


@gelu_quant.register_fake
def _(h: Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    return h.new_empty(h.shape, dtype=out_dtype), h.new_empty((h.shape[0], 1), dtype=torch.float32)


def _norm_modulate_shapes(x: Tensor, quant: bool, out_dtype: torch.dtype | None) -> tuple[tuple, torch.dtype, tuple]:
    B, L, K = x.shape
    if quant:
        return (B * L, K), out_dtype or torch.float8_e4m3fn, (B * L, 1)
    return (B, L, K), out_dtype or x.dtype, (0,)


@_Op
def norm_modulate(
    x: Tensor, shift: Tensor, scale: Tensor, quant: bool, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """LayerNorm(x) * (1 + scale) + shift for x (B, L, K), shift and scale broadcastable to it (same dtype as x).

    quant=False: (y (B, L, K) in out_dtype or x's dtype, an empty fp32 tensor); quant=True: y's rows quantised as
    by gelu_quant, (values (B*L, K) in out_dtype or e4m3, fp32 scales (B*L, 1)).
    """
    if x.dim() != 3:
        raise ValueError(f"norm_modulate expects x of shape (B, L, K), got {tuple(x.shape)}")
    for name, t in (("shift", shift), ("scale", scale)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"norm_modulate: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    B, L, K = x.shape
    try:  # expanded views keep stride 0 on broadcast dims: the kernel rereads the same row instead of a copy
        shift, scale = shift.expand(B, L, K), scale.expand(B, L, K)
    except RuntimeError as err:
        raise ValueError(f"norm_modulate: shift/scale {tuple(shift.shape)}, {tuple(scale.shape)} "
                         f"do not broadcast to {(B, L, K)}") from err
    x, shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, shift, scale))
    out_shape, dtype, s_shape = _norm_modulate_shapes(x, quant, out_dtype)
    out = torch.empty(out_shape, dtype=dtype, device=x.device)
    s = torch.empty(s_shape, dtype=torch.float32, device=x.device)
    if B * L and K:
        block, warps = _launch_params(K)
        # Always the hand-rounded casts (HW=False). With the GPU's, the compiler narrows the rounded product and
        # sum to bf16 operations and contracts them into one bf16 FMA, one rounding where eager rounds twice (26%
        # of the values an ulp off on an H200); without FMA contraction at all (enable_fp_fusion=False) the
        # reductions no longer agree with eager's. The kernel is not wired into the model (module docstring).
        _norm_modulate_kernel[(B * L,)](
            x, shift, scale, out, s, L, K, x.stride(0), x.stride(1), shift.stride(0), shift.stride(1),
            scale.stride(0), scale.stride(1), eps, QUANT=quant, BLOCK=block, num_warps=warps,
            **{**_modes(), "HW": False},
        )
    return out, s


@norm_modulate.register_fake
def _(
    x: Tensor, shift: Tensor, scale: Tensor, quant: bool, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    out_shape, dtype, s_shape = _norm_modulate_shapes(x, quant, out_dtype)
    return x.new_empty(out_shape, dtype=dtype), x.new_empty(s_shape, dtype=torch.float32)


@_Op
def qk_norm_rope(t: Tensor, wt: Tensor, i: Tensor, wi: Tensor, rope: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm(t, wt) and RMSNorm(i, wi) per head, concatenated along the sequence, then RoPE.

    t (B, Lt, H, D) text and i (B, Li, H, D) image projections (strided views allowed), wt and wi (D,), rope
    (Lt + Li, D/2) complex64. Returns (B, Lt + Li, H, D), contiguous, in t's dtype.
    """
    if t.dim() != 4 or i.dim() != 4 or t.shape[0] != i.shape[0] or t.shape[2:] != i.shape[2:]:
        raise ValueError(f"qk_norm_rope expects t (B, Lt, H, D) and i (B, Li, H, D), got {tuple(t.shape)}, "
                         f"{tuple(i.shape)}")
    B, Lt, H, D = t.shape
    L = Lt + i.shape[1]
    if D % 2 or wt.shape != (D,) or wi.shape != (D,):
        raise ValueError(f"qk_norm_rope: head dim {D} must be even and the weights ({D},), got "
                         f"{tuple(wt.shape)}, {tuple(wi.shape)}")
    if rope.dtype != torch.complex64 or rope.shape != (L, D // 2):
        raise ValueError(f"qk_norm_rope: rope must be complex64 ({L}, {D // 2}), got {rope.dtype} {tuple(rope.shape)}")
    if t.dtype != i.dtype or len({x.device for x in (t, i, wt, wi, rope)}) != 1:
        raise ValueError("qk_norm_rope: t and i must share a dtype, and all inputs a device")
    out = torch.empty((B, L, H, D), dtype=t.dtype, device=t.device)
    cs = torch.view_as_real(rope)  # (L, D/2, 2) fp32: cos, sin of each pair side by side
    if cs.stride(1) != 2:
        cs = cs.contiguous()
    block_d = triton.next_power_of_2(D)
    block_h = min(triton.next_power_of_2(H), max(1, 1024 // block_d))
    for x, w, l0 in ((t, wt, 0), (i, wi, Lt)):
        if x.shape[1] * B and H:
            x = x if x.stride(-1) == 1 else x.contiguous()
            _qk_norm_rope_kernel[(B * x.shape[1], triton.cdiv(H, block_h))](
                x, w, cs, out, x.shape[1], l0, L, H, D, x.stride(0), x.stride(1), x.stride(2), cs.stride(0),
                eps, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4, HW=_modes()["HW"],
            )
    return out


@qk_norm_rope.register_fake
def _(t: Tensor, wt: Tensor, i: Tensor, wi: Tensor, rope: Tensor, eps: float = 1e-6) -> Tensor:
    B, Lt, H, D = t.shape
    return t.new_empty((B, Lt + i.shape[1], H, D))


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, HW: tl.constexpr,
                       DIV_RN: tl.constexpr, GELU: tl.constexpr):
    # The whole row in registers. For gelu_quant, walking it in chunks twice (GELU computed in both passes, the
    # row read back from L2) measured slower on an H200: 0.108 against 0.096 ms for 4096 rows of 12288.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    y = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        y = _gelu(y, x_ptr.dtype.element_ty, HW)
    _quantize_store(y, mask, q_ptr + row * stride_q, s_ptr, row, HW, DIV_RN)


def quantize_rows(x: Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """qimg.runtime.fp8.quantize_rowwise of x (M, K) in one pass: (values (M, K) in out_dtype, fp32 scales
    (M, 1)), for weights as they load. A plain launch, not a custom op: nothing traces it, and a custom op's Python
    dispatch cost more than the eight eager calls it replaces while loading threads compete for the GIL (12.7 s of
    a load in bench/stack_sampler.py on an H200 host): each torch call releases the GIL and waits to get it back,
    and this is two allocations and one launch."""
    return _rowwise("quantize_rows", x, out_dtype, gelu=False)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, n_elements, K, BLOCK: tl.constexpr, HW: tl.constexpr):
    # flat over the (N, K) weight; each element's row picks its per-output-channel scale
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # e4m3 -> fp32 is exact
    s = _round(tl.load(s_ptr + offs // K, mask=mask, other=1.0), out_ptr.dtype.element_ty, HW)
    # the scale rounded to the compute dtype, then one rounding of the product: qimg.runtime.fp8._dequantize
    tl.store(out_ptr + offs, _cast(w * s, out_ptr.dtype.element_ty, HW), mask=mask)


@_Op
def dequantize_rows(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, K) e4m3 weight times its N fp32 per-row scales, in `dtype` (bf16 or fp16): one pass over the weight,
    3 bytes per element where the eager form (cast, then multiply) moves 7."""
    if weight.dim() != 2 or scale.numel() != weight.shape[0]:
        raise ValueError(f"dequantize_rows: weight {tuple(weight.shape)} and scale {tuple(scale.shape)} disagree")
    weight, scale = weight.contiguous(), scale.contiguous()
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    n, block = weight.numel(), 4096
    if n:
        _dequant_kernel[(triton.cdiv(n, block),)](weight, scale, out, n, weight.shape[1], BLOCK=block, num_warps=8,
                                                      HW=_modes()["HW"])
    return out


@dequantize_rows.register_fake
def _(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return weight.new_empty(weight.shape, dtype=dtype)


@_Op
def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """tanh-GELU(x @ weight.T + bias) with the GELU in cuBLASLt's epilogue: x (M, K), weight (N, K), bias (N,).
    Not Triton, but kept opaque to torch.compile like the kernels above: inductor would otherwise split it into a
    matmul and a separate GELU pass (measured: bench/results/fusions_*.json). CUDA only: on the CPU,
    _addmm_activation applies erf's GELU, not tanh's."""
    if not x.is_cuda:
        raise ValueError("qimg::linear_gelu runs on CUDA devices only")
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


@linear_gelu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))
