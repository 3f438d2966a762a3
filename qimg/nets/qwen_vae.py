"""Qwen-Image VAE: the Wan-2.1 causal video VAE (Wan team 2025) fine-tuned by the Qwen team, image path only.

The released network is 3-D and causal in time. For a single frame every 3x3x3 causal conv sees two zero
frames before the real one, so it equals a 2-D conv with the last temporal kernel slice; the temporal
resampling convs (time_conv) never run for one frame. So everything here is plain 2-D: no frame loop, no
caches. Module names are the official checkpoint key names; the loader slices the 5-D kernels (keymaps.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.nets.layers import sdpa
from qimg.specs import QwenVAEParams


def conv3x3(in_dim: int, out_dim: int) -> nn.Conv2d:
    """A causal 3x3x3 conv as run on one frame: spatial zero padding 1, no temporal extent."""
    return nn.Conv2d(in_dim, out_dim, 3, padding=1)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels as F.normalize (L2, eps 1e-12) * sqrt(C) * gamma; gamma stored as (C, 1, 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # Sub-fp32 inputs (bf16, fp16, fp8) normalise in fp32 and round once, as diffusers has since v0.38.
        y = F.normalize(x.float() if x.dtype.itemsize < 4 else x, dim=1).to(x.dtype)
        return y * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the (1x1 conv when channels change) shortcut."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_dim)
        self.conv1 = conv3x3(in_dim, out_dim)
        self.norm2 = ChannelRMSNorm(out_dim)
        self.conv2 = conv3x3(out_dim, out_dim)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout (0.0 in every release) is inference-inert
        return h + self.conv_shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv projections, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, 3C), channels ordered q | k | v
        q, k, v = (t.unflatten(-1, (1, c)) for t in qkv.chunk(3, dim=-1))  # (B, HW, 1, C)
        # PyTorch SDPA directly, not the engine's attention switch: this one head is C wide (384 in the release),
        # past what flash-attn takes (256), and SDPA picks a kernel that fits any head dim.
        out = sdpa(q, k, v).flatten(2).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class MidBlock(nn.Module):
    """resnets.0 -> attentions.0 -> resnets.1 at the lowest resolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Resample(nn.Module):
    """2x spatial down- (pad right/bottom, stride-2 conv) or upsampling (nearest, conv halving channels)."""

    def __init__(self, dim: int, up: bool) -> None:
        super().__init__()
        self.up = up
        conv = nn.Conv2d(dim, dim // 2, 3, padding=1) if up else nn.Conv2d(dim, dim, 3, stride=2)
        # Index 0 held the parameter-free pad/upsample layer in the official layout; an Identity keeps the
        # conv at `resample.1`, its checkpoint name. The ops themselves run in forward.
        self.resample = nn.ModuleList([nn.Identity(), conv])

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            # diffusers upsamples in fp32 and casts back; nearest only copies values, so the native dtype gives
            # the same bits at half the memory.
            x = F.interpolate(x, scale_factor=2.0, mode="nearest-exact")
        else:
            x = F.pad(x, (0, 1, 0, 1))  # asymmetric: the stride-2 window starts at the top-left pixel
        return self.resample[1](x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * z_dim, H/8, W/8), before quant_conv."""

    def __init__(self, p: QwenVAEParams) -> None:
        super().__init__()
        dims = [p.base_dim * m for m in (1, *p.dim_mult)]
        self.conv_in = conv3x3(p.in_channels, dims[0])
        # One flat list, as in the checkpoint: per stage num_res_blocks resnets (each followed by attention
        # when the stage's scale is in attn_scales), then a downsampler except after the last stage.
        blocks: list[nn.Module] = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(p.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in p.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(p.dim_mult) - 1:
                blocks.append(Resample(out_dim, up=False))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = conv3x3(dims[-1], 2 * p.z_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class UpBlock(nn.Module):
    """num_res_blocks + 1 resnets, then an optional 2x upsampler."""

    def __init__(self, in_dim: int, out_dim: int, num_resnets: int, up: bool) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * num_resnets
        self.resnets = nn.ModuleList(ResidualBlock(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.upsamplers = nn.ModuleList([Resample(out_dim, up=True)] if up else [])

    def forward(self, x: Tensor) -> Tensor:
        for block in (*self.resnets, *self.upsamplers):
            x = block(x)
        return x


class Decoder(nn.Module):
    """Latents (B, z_dim, h, w) (after post_quant_conv) -> image (B, in_channels, 8h, 8w), unclamped."""

    def __init__(self, p: QwenVAEParams) -> None:
        super().__init__()
        dims = [p.base_dim * m for m in (p.dim_mult[-1], *reversed(p.dim_mult))]
        self.conv_in = conv3x3(p.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0])
        n = len(p.dim_mult)
        # Each upsampler's conv halves the channels, hence in_dim // 2 after the first block. attn_scales adds
        # no attention to the decoder in the reference either.
        self.up_blocks = nn.ModuleList(
            UpBlock(in_dim if i == 0 else in_dim // 2, out_dim, p.num_res_blocks + 1, up=i != n - 1)
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True))
        )
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = conv3x3(dims[-1], p.in_channels)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class QwenVAE(nn.Module):
    """The Qwen-Image KL autoencoder for single images; 8x spatial compression, z_dim latent channels."""

    def __init__(self, p: QwenVAEParams) -> None:
        super().__init__()
        self.params = p
        self.encoder = Encoder(p)
        self.quant_conv = nn.Conv2d(2 * p.z_dim, 2 * p.z_dim, 1)
        self.post_quant_conv = nn.Conv2d(p.z_dim, p.z_dim, 1)
        self.decoder = Decoder(p)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, in_channels, H, W) in [-1, 1], H, W multiples of 8 -> (mean, logvar): (B, z_dim, H/8, W/8).

        mean is the posterior mode (the edit pipelines use it); a sample is mean + exp(logvar / 2) * noise.
        """
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each axis."""
        return self.params.scale_factor

    def decode_unclamped(self, z: Tensor) -> Tensor:
        """decode without the final clamp (tiled decoding blends tiles first, then clamps once)."""
        return self.decoder(self.post_quant_conv(z))

    def decode(self, z: Tensor) -> Tensor:
        """z (B, z_dim, h, w) raw (denormalised) latents -> image (B, in_channels, 8h, 8w) in [-1, 1]."""
        return self.decode_unclamped(z).clamp(-1.0, 1.0)

    def normalize(self, z: Tensor, *, reciprocal: bool = False) -> Tensor:
        """VAE latents -> the transformer's latent space (see normalize_latents)."""
        return normalize_latents(z, self.params, reciprocal=reciprocal)

    def denormalize(self, z: Tensor) -> Tensor:
        """The transformer's latent space -> VAE latents, ready to decode (see denormalize_latents)."""
        return denormalize_latents(z, self.params)


def _latent_stats(z: Tensor, params: QwenVAEParams) -> tuple[Tensor, Tensor]:
    # Broadcast over channel axis 1 of 4-D (B, C, h, w) or 5-D (B, C, T, h, w) latents, in z's dtype.
    shape = (1, -1) + (1,) * (z.ndim - 2)
    mean = torch.tensor(params.latents_mean).view(shape).to(z.device, z.dtype)
    std = torch.tensor(params.latents_std).view(shape).to(z.device, z.dtype)
    return mean, std


def normalize_latents(z: Tensor, params: QwenVAEParams, *, reciprocal: bool = False) -> Tensor:
    """VAE latents -> the transformer's space: (z - mean) / std per channel, stats cast to z's dtype first.

    The edit pipelines divide by std; img2img and inpaint multiply by 1 / std (computed on the cast std),
    which rounds differently in bf16: pass reciprocal=True to match those bit for bit.
    """
    mean, std = _latent_stats(z, params)
    return (z - mean) * (1.0 / std) if reciprocal else (z - mean) / std


def denormalize_latents(z: Tensor, params: QwenVAEParams) -> Tensor:
    """Transformer-space latents -> VAE latents, as the pipelines do before decoding: z / (1 / std) + mean.

    std and mean are cast to z's dtype before the reciprocal is taken, so in bf16 this is not z * std + mean.
    """
    mean, std = _latent_stats(z, params)
    return z / (1.0 / std) + mean
