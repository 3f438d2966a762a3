"""FLUX.1 (Black Forest Labs 2024): a rectified-flow transformer of double-stream (MMDiT) blocks, then single-stream
blocks over the joint [text, image] sequence; packed latents, T5 text and a CLIP pooled vector in, velocity out.

Module names are the key names of diffusers' FluxTransformer2DModel, the layout of the released diffusers-format
weights, so they load with an identity key map. The numerics follow diffusers_facts.md 6.1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.nets.layers import (
    AdaNormOut,
    FeedForward,
    MLPEmbedder,
    attention,
    layer_norm,
    linear_gelu,
    modulate,
    norm_rope,
    timestep_embedding,
)
from qimg.specs import FluxParams


def flux_ids(txt_len: int, grids: Sequence[tuple[int, int, int]]) -> Tensor:
    """Position ids (txt_len + sum h*w, 3) float32 for [text, image 0, image 1, ...], in the model's token order.

    Text tokens sit at (0, 0, 0), so RoPE leaves them unrotated. Each image of `grids` is (frame id f, packed rows h,
    packed cols w) and its tokens sit at (f, row, col), row-major, not centred: the target is (0, h, w) and
    FluxKontextPipeline's reference image (1, h, w). Float32 keeps every position exact, where diffusers' bf16 ids
    would round rows and columns past 256.
    """
    parts = [torch.zeros(txt_len, 3)]
    for f, h, w in grids:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        parts.append(torch.stack([torch.full_like(rows, f), rows, cols], dim=-1).reshape(-1, 3).float())
    return torch.cat(parts)


def flux_rope(ids: Tensor, axes_dims: Sequence[int], theta: float = 10000.0) -> Tensor:
    """Multi-axis RoPE (Su et al. 2021) table for ids (S, n_axes): (S, sum(axes_dims) / 2) complex64.

    Axis i owns axes_dims[i] channels of each head, i.e. axes_dims[i] / 2 adjacent channel pairs, rotated by
    pos * theta^(-2k / d_i). Angles, cos and sin are computed in float64 and rounded once to float32, as diffusers'
    FluxPosEmbed does (its ids go through float32 first, which changes no integer position). Build the ids on the
    CPU or CUDA: MPS has no float64.
    """
    pos = ids.float().double()
    parts = []
    for axis, d in enumerate(axes_dims):
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d))
        parts.append(torch.outer(pos[:, axis], inv_freq))  # (S, d / 2)
    angles = torch.cat(parts, dim=-1)
    return torch.complex(angles.cos().float(), angles.sin().float())


class Modulation(nn.Module):
    """adaLN-Zero parameters (DiT, Peebles & Xie 2023): Linear(SiLU(temb)) split into n (B, 1, D) chunks.

    A module of its own only to keep the checkpoint's `norm1.linear` / `norm.linear` names.
    """

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(temb))[:, None].chunk(self.n, dim=-1)


def _qk_norm(head_dim: int) -> nn.RMSNorm:
    # torch's own RMSNorm, as diffusers' Flux uses (fp32 statistics, cast to the input dtype, then the weight),
    # rather than qimg.nets.layers.RMSNorm, so the two agree bit for bit in every dtype.
    return nn.RMSNorm(head_dim, eps=1e-6)


class JointAttention(nn.Module):
    """Double-stream attention: per-stream QKV and QK RMSNorm, one attention over [text, image], per-stream out."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = _qk_norm(head_dim), _qk_norm(head_dim)
        self.norm_added_q, self.norm_added_k = _qk_norm(head_dim), _qk_norm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 1 was a parameterless Dropout
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, c: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        heads = (-1, self.head_dim)
        iq = self.to_q(x).unflatten(-1, heads)  # (B, Li, H, Dh), normalised in norm_rope
        ik = self.to_k(x).unflatten(-1, heads)
        iv = self.to_v(x).unflatten(-1, heads)
        tq = self.add_q_proj(c).unflatten(-1, heads)  # (B, Lt, H, Dh)
        tk = self.add_k_proj(c).unflatten(-1, heads)
        tv = self.add_v_proj(c).unflatten(-1, heads)
        q = norm_rope(tq, self.norm_added_q, iq, self.norm_q, rope)  # (B, Lt + Li, H, Dh)
        k = norm_rope(tk, self.norm_added_k, ik, self.norm_k, rope)
        out = attention(q, k, torch.cat([tv, iv], dim=1))  # (B, Lt + Li, D)
        c_out, x_out = out.split([c.shape[1], x.shape[1]], dim=1)
        # Contiguous, as diffusers makes them: a batched matmul reads a strided input with other kernels (CPU bf16
        # rounds differently), and it would copy it anyway.
        return self.to_out[0](x_out.contiguous()), self.to_add_out(c_out.contiguous())


class SelfAttention(nn.Module):
    """Single-stream attention: QKV with QK RMSNorm over the joint sequence; the block's proj_out mixes the result."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = _qk_norm(head_dim), _qk_norm(head_dim)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        heads = (-1, self.head_dim)
        q = norm_rope(None, None, self.to_q(x).unflatten(-1, heads), self.norm_q, rope)  # (B, L, H, Dh)
        k = norm_rope(None, None, self.to_k(x).unflatten(-1, heads), self.norm_k, rope)
        return attention(q, k, self.to_v(x).unflatten(-1, heads))  # (B, L, D)


class DoubleBlock(nn.Module):
    """MMDiT block (Esser et al. 2024): each stream has its own modulation, projections and MLP; attention is joint."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = Modulation(dim, 6)
        self.norm1_context = Modulation(dim, 6)
        self.attn = JointAttention(dim, head_dim)
        self.ff = FeedForward(dim, 4 * dim)
        self.ff_context = FeedForward(dim, 4 * dim)

    def forward(self, x: Tensor, c: Tensor, temb: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, Li, D) image, c (B, Lt, D) text, temb (B, D), rope (Lt + Li, Dh / 2) -> (x, c)."""
        # Chunk order: shift, scale, gate for attention, then shift, scale, gate for the MLP; each (B, 1, D).
        x_shift, x_scale, x_gate, x_shift2, x_scale2, x_gate2 = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        x_attn, c_attn = self.attn(modulate(layer_norm(x), x_shift, x_scale), modulate(layer_norm(c), c_shift, c_scale),
                                   rope)
        x = x + x_gate * x_attn
        x = x + x_gate2 * self.ff(modulate(layer_norm(x), x_shift2, x_scale2))
        c = c + c_gate * c_attn
        c = c + c_gate2 * self.ff_context(modulate(layer_norm(c), c_shift2, c_scale2))
        if c.dtype == torch.float16:  # diffusers clips the text stream only here; the image stream is left as is
            c = c.clip(-65504, 65504)
        return x, c


class SingleBlock(nn.Module):
    """Single-stream block (FLUX.1): attention and MLP in parallel from one modulated input, one output projection."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.norm = Modulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, 4 * dim)
        self.attn = SelfAttention(dim, head_dim)
        self.proj_out = nn.Linear(dim + 4 * dim, dim)

    def forward(self, h: Tensor, temb: Tensor, rope: Tensor) -> Tensor:
        """h (B, Lt + Li, D) joint [text, image] tokens, temb (B, D), rope (Lt + Li, Dh / 2) -> h."""
        shift, scale, gate = self.norm(temb)
        n = modulate(layer_norm(h), shift, scale)
        mlp = linear_gelu(self.proj_mlp, n)  # (B, L, 4D)
        h = h + gate * self.proj_out(torch.cat([self.attn(n, rope), mlp], dim=-1))
        if h.dtype == torch.float16:
            h = h.clip(-65504, 65504)
        return h


class TimeTextEmbed(nn.Module):
    """Conditioning vector: MLP(sinusoid(1000 t)) [+ MLP(sinusoid(1000 g)) when guidance-distilled] + MLP(pooled)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, t: Tensor, guidance: Tensor | None, pooled: Tensor) -> Tensor:
        """t, guidance: (B,) already scaled by 1000; pooled (B, pooled_dim) -> (B, D)."""
        temb = self.timestep_embedder(timestep_embedding(t, 256).to(pooled.dtype))
        if self.guidance_embedder is not None and guidance is not None:
            temb = temb + self.guidance_embedder(timestep_embedding(guidance, 256).to(pooled.dtype))
        return temb + self.text_embedder(pooled)


class FluxTransformer(nn.Module):
    """The FLUX.1 transformer; forward takes tensors only (the RoPE table comes from flux_rope, built by the caller)."""

    def __init__(self, p: FluxParams) -> None:
        super().__init__()
        self.params = p
        d, hd = p.dim, p.attention_head_dim
        self.x_embedder = nn.Linear(p.in_channels, d)
        self.context_embedder = nn.Linear(p.joint_attention_dim, d)
        self.time_text_embed = TimeTextEmbed(d, p.pooled_projection_dim, p.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(DoubleBlock(d, hd) for _ in range(p.num_layers))
        self.single_transformer_blocks = nn.ModuleList(SingleBlock(d, hd) for _ in range(p.num_single_layers))
        self.norm_out = AdaNormOut(d)
        self.proj_out = nn.Linear(d, p.patch_size**2 * (p.out_channels or p.in_channels))

    def forward(
        self, x: Tensor, txt: Tensor, t: Tensor, guidance: Tensor | None, pooled: Tensor, rope: Tensor
    ) -> Tensor:
        """x (B, Li, in_channels) packed latents: the target's tokens, then any Kontext reference tokens;
        txt (B, Lt, joint_attention_dim) T5 states; t (B,) timestep in [0, 1] (sigma); guidance (B,) the distilled
        guidance scale (e.g. 3.5), required by guidance-distilled models (dev, Kontext) and refused by the others
        (schnell); pooled (B, pooled_projection_dim) CLIP pooled output; rope = flux_rope(flux_ids(Lt, grids), ...),
        (Lt + Li, attention_head_dim / 2). All inputs in the weights' dtype. Returns the velocity for every image
        token, (B, Li, out_channels): slice the target's tokens off the front."""
        if (guidance is None) == (self.time_text_embed.guidance_embedder is not None):
            need = "needs a" if guidance is None else "takes no"
            raise ValueError(f"this FLUX.1 transformer {need} guidance value (its config's guidance_embeds)")
        h = self.x_embedder(x)  # (B, Li, D)
        # The model scales by 1000 in the hidden dtype, so bf16 rounds 1000 t before the sinusoid, as in diffusers.
        t = t.to(h.dtype) * 1000
        g = None if guidance is None else guidance.to(h.dtype) * 1000
        temb = self.time_text_embed(t, g, pooled)  # (B, D)
        c = self.context_embedder(txt)  # (B, Lt, D)
        for block in self.transformer_blocks:
            h, c = block(h, c, temb, rope)
        lt = c.shape[1]
        joint = torch.cat([c, h], dim=1)  # the single-stream blocks run on [text, image] as one sequence
        for block in self.single_transformer_blocks:
            joint = block(joint, temb, rope)
        return self.proj_out(self.norm_out(joint[:, lt:], temb))
