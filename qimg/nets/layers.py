"""Shared primitives of the image transformers: norms, timestep embedding, RoPE, modulation, and THE attention call."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) computed in fp32, cast to the weight dtype before the weight multiply."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(var + self.eps)
        # Half-precision weights: round the normalised value first, as diffusers does, so bf16 runs agree.
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return (y * self.weight).to(x.dtype)


def layer_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm without learned affine parameters."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation (DiT, Peebles & Xie 2023): x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


class AdaNormOut(nn.Module):
    """Final adaptive LayerNorm without affine weights (Qwen-Image's and FLUX.1's norm_out); the released
    weights emit (scale, shift) in that order (diffusers' AdaLayerNormContinuous)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype))[:, None].chunk(2, dim=-1)
        return modulate(layer_norm(x), shift, scale)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, scale: float = 1.0) -> Tensor:
    """Sinusoidal embedding of t as [cos | sin] (the flip_sin_to_cos layout of the released weights)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = scale * (t[:, None].float() * torch.exp(exponent)[None, :])  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """Two linears with a SiLU between them; the names match the official checkpoints."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _linear_gelu_torch(linear: nn.Module, x: Tensor) -> Tensor:
    return F.gelu(linear(x), approximate="tanh")


_linear_gelu_impl: Callable[[nn.Module, Tensor], Tensor] = _linear_gelu_torch


def set_linear_gelu_impl(fn: Callable[[nn.Module, Tensor], Tensor] | None) -> Callable[[nn.Module, Tensor], Tensor]:
    """Swap the kernel behind linear_gelu() (qimg.runtime.kernels: GELU in the matmul's epilogue; None restores
    the PyTorch form); returns the previous one."""
    global _linear_gelu_impl
    previous, _linear_gelu_impl = _linear_gelu_impl, fn or _linear_gelu_torch
    return previous


def linear_gelu(linear: nn.Module, x: Tensor) -> Tensor:
    """tanh-GELU(linear(x)), the MLPs' up projection: one call site, so the GELU can run inside the matmul."""
    return _linear_gelu_impl(linear, x)


class GeluProj(nn.Module):
    """Linear followed by tanh-approximated GELU; a module of its own only to keep the checkpoint's `.proj` name."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return linear_gelu(self.proj, x)


class FeedForward(nn.Module):
    """GELU(tanh) MLP laid out as `net.0.proj` / `net.2`, the diffusers key names of the released weights."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # Index 1 held a Dropout in training; an Identity keeps index 2 where the checkpoint expects it.
        self.net = nn.ModuleList([GeluProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


def rope_angles(positions: Tensor, axes_dims: tuple[int, ...], theta: float = 10000.0) -> Tensor:
    """Multi-axis RoPE (Su et al. 2021) angles: positions (L, n_axes) -> (L, sum(axes_dims) // 2) in fp32."""
    parts = []
    for axis, d in enumerate(axes_dims):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d)
        parts.append(positions[:, axis].float()[:, None] * inv_freq[None, :])
    return torch.cat(parts, dim=-1)


def rope_table(angles: Tensor) -> Tensor:
    """Unit complex rotations exp(i * angle): (L, D/2) fp32 -> (L, D/2) complex64."""
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2k], x[2k+1]) of x (B, L, H, D) by rope (L, D/2) complex64, in fp32.

    Eager: one complex multiply is a single kernel, where the real form costs several passes over q and k.
    Compiled: the real form, which inductor fuses with the QK norm around it (complex tensors block fusion).
    """
    if torch.compiler.is_compiling():
        xf = x.float().unflatten(-1, (-1, 2))  # (B, L, H, D/2, 2)
        a, b = xf[..., 0], xf[..., 1]
        cos, sin = rope.real[None, :, None, :], rope.imag[None, :, None, :]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, H, D/2)
    return torch.view_as_real(xc * rope[None, :, None, :]).flatten(-2).to(x.dtype)


NormRopeFn = Callable[[Tensor | None, "nn.Module | None", Tensor, nn.Module, Tensor], Tensor]


def _norm_rope_torch(t: Tensor | None, t_norm: nn.Module | None, i: Tensor, i_norm: nn.Module, rope: Tensor) -> Tensor:
    joined = i_norm(i) if t is None or t_norm is None else torch.cat([t_norm(t), i_norm(i)], dim=1)
    return apply_rope(joined, rope)


_norm_rope_impl: NormRopeFn = _norm_rope_torch


def set_norm_rope_impl(fn: NormRopeFn | None) -> NormRopeFn:
    """Swap the kernel behind norm_rope() (qimg.runtime.kernels does this; None restores the PyTorch one);
    returns the previous one."""
    global _norm_rope_impl
    previous, _norm_rope_impl = _norm_rope_impl, fn or _norm_rope_torch
    return previous


def norm_rope(t: Tensor | None, t_norm: nn.Module | None, i: Tensor, i_norm: nn.Module, rope: Tensor) -> Tensor:
    """The q or k path of attention: each stream's heads RMS-normalised by its own norm, joined [text, image]
    along the tokens, rotated by rope. t, i: (B, L, H, D) (t None: one stream); rope: (Lt + Li, D/2) complex64.
    One call site for both families, so a fused kernel (one pass instead of norm, concatenation and rotation)
    is one switch."""
    return _norm_rope_impl(t, t_norm, i, i_norm, rope)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """PyTorch's scaled_dot_product_attention on (B, L, H, D) tensors; mask: bool (B, L_k), True = attend."""
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
_attention_impl: AttentionFn = sdpa


def set_attention_impl(fn: AttentionFn) -> AttentionFn:
    """Swap the kernel behind attention() (qimg.runtime.attention does this); returns the previous one."""
    global _attention_impl
    previous, _attention_impl = _attention_impl, fn
    return previous


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward hands on a contiguous gradient. cuDNN's attention backward fails on a strided
    output gradient ("mha_graph.execute ... is_good()", then an illegal memory access: torch 2.11, H200), which
    is what a consumer that slices the attention output gives it (FLUX's single blocks concatenate it with their
    MLP branch before proj_out)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017); the engine's one call site, so kernels are one switch.

    q, k, v: (B, L, H, D); mask: None or bool (B, L_k) with True = attend. Returns (B, L, H * D).
    """
    out = _attention_impl(q, k, v, mask).flatten(2)
    return _ContiguousGrad.apply(out) if out.requires_grad else out
