"""Tiled VAE encode and decode: overlapping tiles, cross-faded with raised-cosine ramps, for images of any size.

Applied from outside: pure functions that take any loaded VAE with encode, decode_unclamped and scale_factor
and store nothing on it. The tile grid covers the image exactly: tiles start every tile - overlap and the last
one is moved back to end at the border, so a size that is not a multiple of the tile still uses full tiles.
Each tile's weights ramp up across its overlap with the previous tile and down across the next, and are
divided by the sum over all tiles (per axis; the 2-D weight is the product), so the weights of every pixel
sum to exactly one whatever the grid. An image that fits one tile is passed to the plain encode/decode, so it
gives the untiled result bit for bit.

Tiled output is not the untiled output: the mid block's attention sees one tile, not the whole image, and
pixels near a tile border see zero padding where the untiled net sees neighbours. The overlap is there so that
these border pixels get almost no weight and the seams fade in instead of stepping.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from qimg.runtime.options import SCALE, Tiling

__all__ = ["SCALE", "Tiling", "axis_weights", "decode_tiled", "encode_tiled", "tile_spans"]


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of each tile along an axis of `size`: every tile - overlap, the last one flush with the end."""
    if size <= tile:
        return [(0, size)]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return [(s, s + tile) for s in starts]


def _ramp(n: int, device: torch.device) -> Tensor:
    """n weights rising from near 0 to near 1: sin^2 at the pixel centres, so ramp + reversed ramp == 1."""
    s = (torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n
    return torch.sin(s * (math.pi / 2)) ** 2


def axis_weights(spans: list[tuple[int, int]], scale: int, device: torch.device) -> list[Tensor]:
    """Per tile, its blend weights along one axis at `scale` output units per grid unit, normalised across tiles.

    The ramps span the actual overlap with each neighbour (larger for the last, moved-back tile). Strictly
    positive everywhere, so the normalisation never divides by zero; overlap 0 gives hard cuts.
    """
    weights = []
    for i, (start, end) in enumerate(spans):
        w = torch.ones((end - start) * scale, device=device, dtype=torch.float64)
        if i > 0 and (n := (spans[i - 1][1] - start) * scale) > 0:
            w[:n] *= _ramp(n, device)
        if i + 1 < len(spans) and (n := (end - spans[i + 1][0]) * scale) > 0:
            w[-n:] *= _ramp(n, device).flip(0)
        weights.append(w)
    total = torch.zeros(spans[-1][1] * scale, device=device, dtype=torch.float64)
    for (start, _), w in zip(spans, weights, strict=True):
        total[start * scale : start * scale + w.numel()] += w
    return [(w / total[s * scale : s * scale + w.numel()]).float() for (s, _), w in zip(spans, weights, strict=True)]


def _grid(h: int, w: int, tile: int, overlap: int, scale: int, device: torch.device):
    """(ys, xs, wy, wx): tile spans in input units and their normalised weights in output units."""
    ys, xs = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    return ys, xs, axis_weights(ys, scale, device), axis_weights(xs, scale, device)


def _factor(vae: Any, tiling: Tiling) -> int:
    """The VAE's pixels per latent; tiles must fall on whole latents of it."""
    f = int(vae.scale_factor)
    if tiling.tile % f or tiling.overlap % f:
        raise ValueError(f"tile size and overlap must be multiples of {f} px for this VAE")
    return f


@torch.no_grad()
def decode_tiled(vae: Any, z: Tensor, tiling: Tiling) -> Tensor:
    """Raw latents (B, z_dim, h, w) -> image (B, C, 8h, 8w) in [-1, 1], decoded one latent tile at a time.

    Peak memory is one tile's activations plus the fp32 output (12 bytes per pixel at batch 1).
    """
    f = _factor(vae, tiling)
    tile, overlap = tiling.tile // f, tiling.overlap // f  # latent units
    b, _, h, w = z.shape
    if h <= tile and w <= tile:
        return vae.decode(z)
    ys, xs, wy, wx = _grid(h, w, tile, overlap, f, z.device)
    out = None
    for (y0, y1), wy_i in zip(ys, wy, strict=True):
        for (x0, x1), wx_j in zip(xs, wx, strict=True):
            # Unclamped tiles: the clamp is applied once to the blend, as the untiled decode clamps its output.
            part = vae.decode_unclamped(z[:, :, y0:y1, x0:x1])  # (B, C, 8th, 8tw)
            if out is None:  # allocated once the channel count is known
                out = torch.zeros(b, part.shape[1], h * f, w * f, device=z.device, dtype=torch.float32)
            region = out[:, :, y0 * f : y1 * f, x0 * f : x1 * f]
            region.addcmul_(part.float(), wy_i[:, None] * wx_j[None, :])
            del part
    assert out is not None
    return out.clamp_(-1.0, 1.0).to(z.dtype)


@torch.no_grad()
def encode_tiled(vae: Any, x: Tensor, tiling: Tiling) -> tuple[Tensor, Tensor]:
    """Image (B, C, H, W) in [-1, 1], H and W multiples of 8 -> (mean, logvar) (B, z_dim, H/8, W/8), by pixel tiles.

    Both moments are blended with the same weights (over tiling.overlap / 8 latents), as diffusers blends them.
    """
    f = _factor(vae, tiling)
    b, _, h, w = x.shape
    if h % f or w % f:
        raise ValueError(f"tiled encode needs a height and width that are multiples of {f}, got {h}x{w}")
    if h <= tiling.tile and w <= tiling.tile:
        return vae.encode(x)
    # Tile spans in latent units: tile, overlap and the image are multiples of 8, so every start is too.
    ys, xs, wy, wx = _grid(h // f, w // f, tiling.tile // f, tiling.overlap // f, 1, x.device)
    mean = logvar = None
    for (y0, y1), wy_i in zip(ys, wy, strict=True):
        for (x0, x1), wx_j in zip(xs, wx, strict=True):
            m, lv = vae.encode(x[:, :, y0 * f : y1 * f, x0 * f : x1 * f])  # (B, z, th, tw)
            if mean is None or logvar is None:
                shape = (b, m.shape[1], h // f, w // f)
                mean = torch.zeros(shape, device=x.device, dtype=torch.float32)
                logvar = torch.zeros(shape, device=x.device, dtype=torch.float32)
            weight = wy_i[:, None] * wx_j[None, :]
            mean[:, :, y0:y1, x0:x1].addcmul_(m.float(), weight)
            logvar[:, :, y0:y1, x0:x1].addcmul_(lv.float(), weight)
    assert mean is not None and logvar is not None
    return mean.to(x.dtype), logvar.to(x.dtype)
