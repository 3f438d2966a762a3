"""One training step's pieces, without state: the flow-matching loss on packed latents (edit models: with their
controls), its shifted timesteps, the per-micro-batch generator that makes resuming exact, and the adapters'
initialisation. trainer.py runs them."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from qimg.embeddings import PromptEmbeds
from qimg.nets.qwen_mmdit import qwen_rope
from qimg.pipelines.qwen import text_batch
from qimg.request import calculate_dimensions, input_size
from qimg.specs import ModelSpec
from qimg.training.images import upright_size

Grid = tuple[int, int, int]  # (frames, rows, cols) of a token grid, as qwen_rope takes it


def qwen_shift(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """Shift sigmoid-normal timesteps toward noise for larger images (musubi-tuner's qwen_shift)."""
    mu = 0.5 + (0.9 - 0.5) * (tokens - 256) / (8192 - 256)
    s = math.exp(mu)
    return s * t / (1 + (s - 1) * t)


def flow_loss(model: torch.nn.Module, x0: torch.Tensor, texts: Sequence[PromptEmbeds], size: tuple[int, int],
              gen: torch.Generator, dtype: torch.dtype, device: torch.device, *, refs: torch.Tensor | None = None,
              ref_shapes: Sequence[Grid] = ()) -> torch.Tensor:
    """MSE between the model's velocity at x_t and noise - x0, for packed latents x0 (B, L, 64) of one size
    (width, height) and their prompts; noise and timesteps are drawn from `gen` on the CPU (the same on any
    device).

    Edit models: refs (B, L_ref, 64) are the packed control latents, one token grid each in ref_shapes (shared by
    the batch). They follow the noisy tokens as at inference (qwen_velocity) and are never noised; the model is
    told where the targets end, and their own predictions are dropped: the loss covers the L target tokens."""
    n_target = x0.shape[1]
    noise = torch.randn(x0.shape, generator=gen)
    # The shift follows the target's token count, as the sampler's mu does at inference (run_qwen_edit).
    t = qwen_shift(torch.sigmoid(torch.randn(x0.shape[0], generator=gen)), n_target)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    txt, mask = text_batch([p.to(device) for p in texts], dtype)
    params = model.params
    w, h = size
    shapes = [(1, h // 16, w // 16), *ref_shapes]
    rope = qwen_rope(shapes, txt.shape[1], params.axes_dims_rope, params.rope_theta).to(device)
    if refs is None:
        if ref_shapes:
            raise ValueError("ref_shapes without refs")
        pred = model(xt.to(device, dtype), txt, t.to(device, dtype), rope, mask)
    else:
        grids = sum(f * gh * gw for f, gh, gw in ref_shapes)
        if refs.shape[0] != x0.shape[0] or refs.shape[1] != grids:
            raise ValueError(f"refs of shape {tuple(refs.shape)} for {x0.shape[0]} items of {grids} control tokens")
        xin = torch.cat([xt.to(device, dtype), refs.to(device, dtype)], dim=1)
        pred = model(xin, txt, t.to(device, dtype), rope, mask, n_target=n_target)[:, :n_target]
    return F.mse_loss(pred.float(), (noise - x0).to(device))


def control_size(spec: ModelSpec, path: Path) -> tuple[int, int]:
    """The (width, height) a control image is VAE-encoded at, as `qimg edit` encodes an input image: for specs
    with training resolutions (FLUX.1-Kontext) the one nearest the image's upright aspect (request.input_size);
    otherwise about the spec's VAE area at that aspect, as run_qwen_edit sizes it (multiples of 32)."""
    width, height = upright_size(path, "control")
    if spec.input_sizes:
        return input_size(spec, width, height)
    return calculate_dimensions(spec.vae_image_area, width / height)


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, step, micro), so a resumed run draws the same."""
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def init_adapters(model: torch.nn.Module, names: Sequence[str], rank: int, seed: int
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's initialisation: down uniform in +-1/sqrt(in) (kaiming-uniform with a = sqrt(5)), up zero, so the
    untrained adapter changes nothing; seeded, independent of the global RNG."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        linear = model.get_submodule(name)
        bound = 1.0 / math.sqrt(linear.in_features)
        down = (torch.rand(rank, linear.in_features, generator=gen) * 2 - 1) * bound
        out[name] = (down, torch.zeros(linear.out_features, rank))
    return out
