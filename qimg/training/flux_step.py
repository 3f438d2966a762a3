"""FLUX.1's training step: the flow-matching loss on packed latents for FLUX.1-dev and, with their controls,
FLUX.1-Kontext-dev. What differs from Qwen-Image's (step.flow_loss):
  * the timestep shift is flux_shift (mu linear from 256 tokens -> 0.5 to 4096 -> 1.15, sd-scripts' and musubi's
    resolution-matched shift; at 1024x1024, e^1.15 = 3.16);
  * the distilled guidance input is 1.0 while training, not the 3.5 used for sampling (every FLUX trainer does
    this; training at 3.5 is a known trap: the LoRA then learns against a guidance it never sees at 1.0-free
    inference and over-saturates);
  * the text is T5's 512 states with no mask plus CLIP's pooled vector, and RoPE ids are FLUX's 3 axes (text at
    zeros, the target at frame 0, Kontext controls after it at frame 1, as FluxKontextPipeline's ids).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qimg.embeddings import PromptEmbeds
from qimg.nets.flux import flux_ids, flux_rope

TRAIN_GUIDANCE = 1.0
Grid = tuple[int, int, int]  # (frame id, rows, cols) of a token grid, as flux_ids takes it


def flux_shift(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """Shift sigmoid-normal timesteps toward noise for larger images (FLUX.1's schedule: mu from 256 -> 0.5 to
    4096 -> 1.15, the sampler's own dynamic shift)."""
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    s = math.exp(mu)
    return s * t / (1 + (s - 1) * t)


def flux_flow_loss(model: torch.nn.Module, x0: torch.Tensor, texts: Sequence[PromptEmbeds], size: tuple[int, int],
                   gen: torch.Generator, dtype: torch.dtype, device: torch.device, *, refs: torch.Tensor | None = None,
                   ref_shapes: Sequence[Grid] = ()) -> torch.Tensor:
    """MSE between the model's velocity at x_t and noise - x0 for packed latents x0 (B, L, 64) of one size (width,
    height); noise and timesteps come from `gen` on the CPU, as in step.flow_loss.

    Kontext: refs (B, L_ref, 64) are the packed control latents, ref_shapes their token grids (trainer order:
    (1, rows, cols), which is FLUX's frame id 1 for references). They follow the noisy tokens, are never noised,
    and their predictions are dropped: the loss covers the L target tokens."""
    n_target = x0.shape[1]
    noise = torch.randn(x0.shape, generator=gen)
    t = flux_shift(torch.sigmoid(torch.randn(x0.shape[0], generator=gen)), n_target)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    lengths = {p.embeds.shape[1] for p in texts}
    if len(lengths) != 1:  # T5 states are padded to max_sequence_length: a batch shares one length
        raise ValueError(f"a FLUX training batch mixes text lengths {sorted(lengths)}")
    txt = torch.cat([p.embeds for p in texts]).to(device, dtype)
    pooled = torch.cat([p.pooled for p in texts]).to(device, dtype)
    p = model.params
    w, h = size
    grids = [(0, h // 16, w // 16), *((1, gh, gw) for _, gh, gw in ref_shapes)]
    rope = flux_rope(flux_ids(txt.shape[1], grids), p.axes_dims_rope, p.rope_theta).to(device)
    g = torch.full((x0.shape[0],), TRAIN_GUIDANCE, device=device) if p.guidance_embeds else None
    xin = xt.to(device, dtype)
    if refs is not None:
        tokens = sum(gh * gw for _, gh, gw in ref_shapes)
        if refs.shape[0] != x0.shape[0] or refs.shape[1] != tokens:
            raise ValueError(f"refs of shape {tuple(refs.shape)} for {x0.shape[0]} items of {tokens} control tokens")
        xin = torch.cat([xin, refs.to(device, dtype)], dim=1)
    elif ref_shapes:
        raise ValueError("ref_shapes without refs")
    pred = model(xin, txt, t.to(device, dtype), g, pooled, rope)[:, :n_target]
    return F.mse_loss(pred.float(), (noise - x0).to(device))
