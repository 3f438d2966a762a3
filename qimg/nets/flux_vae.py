"""FLUX.1 VAE: the KL autoencoder of latent diffusion (Rombach et al. 2022) with 16 latent channels.

The SD-VAE layout as diffusers' AutoencoderKL builds it: GroupNorm + SiLU residual blocks, a stride-2 conv
after right/bottom zero padding to go down, nearest 2x + conv to go up, and one single-head self-attention
in each mid block. FLUX ships it without quant_conv / post_quant_conv. Module names are diffusers' state-dict
keys, so the checkpoint loads without a key map.

Memory: at 1024 px the decoder's last stages hold 256 x 1024 x 1024 activations, so the SiLU after each norm
and the residual adds run in place on tensors this module just created (autograd-safe: GroupNorm and conv
backward need their inputs, not these outputs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from qimg.specs import FluxVAEParams

EPS = 1e-6  # every GroupNorm of the SD-VAE, including the attention's


def group_norm(dim: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, dim, eps=EPS)


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the (1x1 conv when channels change) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_dim, groups)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.norm2 = group_norm(out_dim, groups)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # One step per line, rebinding h: each intermediate is freed as soon as the next exists (a nested call
        # would keep conv1's output alive through conv2, one more full-size tensor at the peak).
        h = F.silu(self.norm1(x), inplace=True)
        h = self.conv1(h)
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)  # dropout (0.0) is inference-inert
        return h.add_(self.conv_shortcut(x))


class AttentionBlock(nn.Module):
    """GroupNorm, then single-head self-attention over the H*W positions with linear projections, residual."""

    def __init__(self, dim: int, groups: int) -> None:
        super().__init__()
        self.group_norm = group_norm(dim, groups)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # to_out.1 was a parameter-free dropout

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        # PyTorch SDPA directly, not the engine's attention switch: one head 512 wide (in the release) is past
        # what flash-attn takes (256); SDPA picks a kernel that fits, without materialising the HW x HW scores
        # where it can. Scale 1/sqrt(C), as diffusers.
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return out.add_(x)


class MidBlock(nn.Module):
    """resnets.0 -> attentions.0 (unless mid_block_add_attention is off) -> resnets.1."""

    def __init__(self, dim: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim, groups), ResnetBlock(dim, dim, groups)])
        self.attentions = nn.ModuleList([AttentionBlock(dim, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv: the window starts at the top-left pixel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv (channels kept)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """A DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional resampler (downsamplers / upsamplers)."""

    def __init__(self, in_dim: int, out_dim: int, num_resnets: int, groups: int, resample: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * num_resnets
        self.resnets = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(dims[:-1], dims[1:], strict=True))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_dim)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_dim)])
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/8, W/8): mean | logvar."""

    def __init__(self, p: FluxVAEParams) -> None:
        super().__init__()
        dims, g = p.block_out_channels, p.norm_num_groups
        self.conv_in = nn.Conv2d(p.in_channels, dims[0], 3, padding=1)
        last = len(dims) - 1
        self.down_blocks = nn.ModuleList(
            Stage(dims[max(i - 1, 0)], dims[i], p.layers_per_block, g, None if i == last else "down")
            for i in range(len(dims))
        )
        self.mid_block = MidBlock(dims[-1], g, p.mid_block_add_attention)
        self.conv_norm_out = group_norm(dims[-1], g)
        self.conv_out = nn.Conv2d(dims[-1], 2 * p.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = F.silu(self.conv_norm_out(self.mid_block(x)), inplace=True)
        return self.conv_out(x)


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> image (B, out_channels, 8h, 8w), unclamped."""

    def __init__(self, p: FluxVAEParams) -> None:
        super().__init__()
        dims, g = tuple(reversed(p.block_out_channels)), p.norm_num_groups
        self.conv_in = nn.Conv2d(p.latent_channels, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], g, p.mid_block_add_attention)
        last = len(dims) - 1
        # up_blocks in diffusers' order: widest (lowest resolution) first; one more resnet per stage than encoding.
        self.up_blocks = nn.ModuleList(
            Stage(dims[max(i - 1, 0)], dims[i], p.layers_per_block + 1, g, None if i == last else "up")
            for i in range(len(dims))
        )
        self.conv_norm_out = group_norm(dims[-1], g)
        self.conv_out = nn.Conv2d(dims[-1], p.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        x = F.silu(self.conv_norm_out(x), inplace=True)  # rebinds x: the full-size input is freed before conv_out
        return self.conv_out(x)


class FluxVAE(nn.Module):
    """The FLUX.1 KL autoencoder: 8x spatial compression, latent_channels (16) channels, no quant convs."""

    def __init__(self, p: FluxVAEParams) -> None:
        super().__init__()
        self.params = p
        self.encoder = Encoder(p)
        self.decoder = Decoder(p)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, in_channels, H, W) in [-1, 1], H, W multiples of 8 -> (mean, logvar): (B, 16, H/8, W/8).

        mean is the posterior mode (Kontext uses it); logvar is clamped to [-30, 20] as diffusers'
        DiagonalGaussianDistribution does; a sample is mean + exp(logvar / 2) * noise.
        """
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each axis."""
        return self.params.scale_factor

    def decode_unclamped(self, z: Tensor) -> Tensor:
        """decode without the final clamp (tiled decoding blends tiles first, then clamps once)."""
        return self.decoder(z)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, 16, h, w) raw (denormalised) latents -> image (B, out_channels, 8h, 8w) in [-1, 1].

        diffusers' decoder does not clamp; the pipelines' postprocess does ((x / 2 + 0.5).clamp(0, 1)), which is
        the same as clamping here to [-1, 1], as QwenVAE.decode returns.
        """
        return self.decode_unclamped(z).clamp(-1.0, 1.0)

    def normalize(self, z: Tensor, *, reciprocal: bool = False) -> Tensor:
        """VAE latents -> the transformer's space: (z - shift_factor) * scaling_factor, as every FLUX pipeline.

        reciprocal is accepted for QwenVAE's interface and changes nothing: the FLUX pipelines (img2img, inpaint,
        Kontext, Fill) all use this one expression, so there is no second rounding to match.
        """
        del reciprocal
        return (z - self.params.shift_factor) * self.params.scaling_factor

    def denormalize(self, z: Tensor) -> Tensor:
        """The transformer's space -> VAE latents, ready to decode: z / scaling_factor + shift_factor."""
        return z / self.params.scaling_factor + self.params.shift_factor
