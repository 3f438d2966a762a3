"""Qwen-Image MMDiT (Qwen team 2025): a double-stream diffusion transformer; packed latents + text in, velocity out.

Module names are the official checkpoint key names, so the released weights load with an identity key map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.nets.layers import (
    AdaNormOut,
    FeedForward,
    MLPEmbedder,
    RMSNorm,
    attention,
    layer_norm,
    modulate,
    norm_rope,
    rope_angles,
    rope_table,
    timestep_embedding,
)
from qimg.specs import QwenMMDiTParams


def qwen_rope(
    img_shapes: list[tuple[int, int, int]], txt_len: int, axes_dims: tuple[int, ...], theta: float = 10000.0
) -> Tensor:
    """Joint RoPE table for [text, image] tokens: (txt_len + sum f*h*w, head_dim/2) complex64.

    Image i of img_shapes (frame count f, packed rows h, packed cols w) sits at frame positions i..i+f-1 on a
    grid centred on 0 (rows -(h - h//2) .. h//2 - 1, likewise cols). Text token j sits at m + j on all three axes,
    m = the largest max(h//2, w//2), so text never collides with image positions.
    """
    grids = []
    for idx, (f, h, w) in enumerate(img_shapes):
        frames = torch.arange(idx, idx + f)
        rows = torch.arange(-(h - h // 2), h // 2)
        cols = torch.arange(-(w - w // 2), w // 2)
        grid = torch.stack(torch.meshgrid(frames, rows, cols, indexing="ij"), dim=-1)  # (f, h, w, 3)
        grids.append(grid.reshape(-1, 3))
    m = max(max(h // 2, w // 2) for _, h, w in img_shapes)
    txt = (m + torch.arange(txt_len))[:, None].expand(txt_len, 3)
    positions = torch.cat([txt, *grids], dim=0)
    return rope_table(rope_angles(positions, axes_dims, theta))


@dataclass(frozen=True)
class TextPadding:
    """A batch of prompts padded to one length: row b has lengths[b] real text tokens, then padding.

    Given instead of a mask, each row attends over its own real tokens only, with no mask at all: the fastest
    kernels stay in play, and the lengths are Python ints, so compiled graphs stay static.
    """

    lengths: tuple[int, ...]


class QwenAttention(nn.Module):
    """Joint attention over [text, image] with per-stream projections and QK RMSNorm."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, c: Tensor, rope: Tensor, mask: Tensor | TextPadding | None
    ) -> tuple[Tensor, Tensor]:
        heads = (-1, self.head_dim)
        tq = self.add_q_proj(c).unflatten(-1, heads)  # (B, Lt, H, Dh), normalised in norm_rope
        tk = self.add_k_proj(c).unflatten(-1, heads)
        tv = self.add_v_proj(c).unflatten(-1, heads)
        iq = self.to_q(x).unflatten(-1, heads)  # (B, Li, H, Dh)
        ik = self.to_k(x).unflatten(-1, heads)
        iv = self.to_v(x).unflatten(-1, heads)
        lt, li = c.shape[1], x.shape[1]
        if isinstance(mask, TextPadding):
            c_rows, x_rows = [], []
            for b, n in enumerate(mask.lengths):
                rows = slice(b, b + 1)
                r = rope if n == lt else torch.cat([rope[:n], rope[lt:]])
                q = norm_rope(tq[rows, :n], self.norm_added_q, iq[rows], self.norm_q, r)
                k = norm_rope(tk[rows, :n], self.norm_added_k, ik[rows], self.norm_k, r)
                out = attention(q, k, torch.cat([tv[rows, :n], iv[rows]], dim=1))  # (1, n + Li, D)
                c_part, x_part = out.split([n, li], dim=1)
                c_rows.append(F.pad(c_part, (0, 0, 0, lt - n)))  # padding rows: zeros, never read
                x_rows.append(x_part)
            c_out, x_out = torch.cat(c_rows), torch.cat(x_rows)
        else:
            q = norm_rope(tq, self.norm_added_q, iq, self.norm_q, rope)  # (B, Lt + Li, H, Dh)
            k = norm_rope(tk, self.norm_added_k, ik, self.norm_k, rope)
            out = attention(q, k, torch.cat([tv, iv], dim=1), mask)  # (B, Lt + Li, D)
            c_out, x_out = out.split([lt, li], dim=1)
        return self.to_out[0](x_out), self.to_add_out(c_out)


class QwenBlock(nn.Module):
    """One double-stream block: adaLN-modulated joint attention and MLP, separate weights per stream."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = QwenAttention(dim, num_heads, head_dim)
        self.img_mlp = FeedForward(dim, 4 * dim)
        self.txt_mlp = FeedForward(dim, 4 * dim)

    def forward(
        self,
        x: Tensor,
        c: Tensor,
        temb: Tensor,
        rope: Tensor,
        mask: Tensor | TextPadding | None,
        n_target: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        # img_mod rows: [shift1 | scale1 | gate1 | shift2 | scale2 | gate2], each (B, D) -> (B, 1, D).
        img_mod = self.img_mod(temb)[:, None].chunk(6, dim=-1)
        if n_target is not None:
            # zero_cond_t: temb holds the real t (first half) and t = 0 (second half); reference-image tokens
            # (those past n_target) take the t = 0 modulation.
            b = temb.shape[0] // 2
            img_mod = tuple(torch.cat([p[:b].expand(-1, n_target, -1),
                                       p[b:].expand(-1, x.shape[1] - n_target, -1)], dim=1) for p in img_mod)
            temb = temb[:b]
        txt_mod = self.txt_mod(temb)[:, None].chunk(6, dim=-1)

        x_attn, c_attn = self.attn(
            modulate(layer_norm(x), img_mod[0], img_mod[1]), modulate(layer_norm(c), txt_mod[0], txt_mod[1]), rope, mask
        )
        x = x + img_mod[2] * x_attn
        c = c + txt_mod[2] * c_attn
        x = x + img_mod[5] * self.img_mlp(modulate(layer_norm(x), img_mod[3], img_mod[4]))
        c = c + txt_mod[5] * self.txt_mlp(modulate(layer_norm(c), txt_mod[3], txt_mod[4]))
        if x.dtype == torch.float16:
            x, c = x.clip(-65504, 65504), c.clip(-65504, 65504)
        return x, c


class TimeEmbed(nn.Module):
    """Sinusoidal timestep features (t scaled by 1000) through an MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.timestep_embedder(timestep_embedding(t, 256, scale=1000.0).to(dtype))


class QwenMMDiT(nn.Module):
    """The Qwen-Image transformer; forward takes tensors only (RoPE table and mask are built by the caller)."""

    def __init__(self, p: QwenMMDiTParams) -> None:
        super().__init__()
        self.params = p
        self.img_in = nn.Linear(p.in_channels, p.dim)
        self.txt_norm = RMSNorm(p.txt_dim)
        self.txt_in = nn.Linear(p.txt_dim, p.dim)
        self.time_text_embed = TimeEmbed(p.dim)
        self.transformer_blocks = nn.ModuleList(QwenBlock(p.dim, p.num_heads, p.head_dim) for _ in range(p.num_layers))
        self.norm_out = AdaNormOut(p.dim)
        self.proj_out = nn.Linear(p.dim, p.patch_size**2 * p.out_channels)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        timestep: Tensor,
        rope: Tensor,
        txt_mask: Tensor | TextPadding | None = None,
        n_target: int | None = None,
    ) -> Tensor:
        """img (B, Li, 64) packed latents (targets first, then any reference tokens); txt (B, Lt, txt_dim);
        timestep (B,) in [0, 1]; rope from qwen_rope; txt_mask (B, Lt) bool, a TextPadding, or None;
        n_target = target token count (needed by zero_cond_t models when reference tokens follow).
        Returns the velocity (B, Li, 64)."""
        x = self.img_in(img)
        c = self.txt_in(self.txt_norm(txt))
        t = timestep.to(x.dtype)
        if self.params.zero_cond_t:
            t = torch.cat([t, t * 0])
            n_target = x.shape[1] if n_target is None else n_target
        else:
            n_target = None
        temb = self.time_text_embed(t, x.dtype)  # (B, D), or (2B, D) with zero_cond_t
        mask: Tensor | TextPadding | None = txt_mask if isinstance(txt_mask, TextPadding) else None
        if isinstance(txt_mask, Tensor):  # callers pass None when no text token is padding: no mask is cheaper
            mask = torch.cat([txt_mask.bool(), txt_mask.new_ones(x.shape[:2], dtype=torch.bool)], dim=1)
        for block in self.transformer_blocks:
            x, c = block(x, c, temb, rope, mask, n_target)
        if n_target is not None:
            temb = temb[: temb.shape[0] // 2]
        return self.proj_out(self.norm_out(x, temb))
