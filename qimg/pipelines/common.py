"""Shared by every pipeline: conversions between PIL images and tensors, and the flow-matching run from noise or
from an input image (img2img, inpainting) that the families share; a family supplies its velocity."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qimg.request import GenerateRequest, calculate_dimensions, img2img_start
from qimg.sampling import Velocity, denoise, flow_sigmas, noise_to, pack, seeded_noise

Progress = Callable[[int, int], None]


def latents_to_images(x: Tensor) -> list[Any]:
    """VAE output in [-1, 1], (B, 3, H, W) -> PIL images (rounded to uint8 as diffusers' postprocess does)."""
    from PIL import Image

    x = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def image_to_tensor(image: Any, width: int, height: int) -> Tensor:
    """PIL image -> (1, 3, height, width) fp32 in [-1, 1], resized with Lanczos when the size differs."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return x * 2.0 - 1.0


def mask_to_tokens(mask: Any, width: int, height: int) -> Tensor:
    """Inpainting mask (white = repaint) -> packed (1, L, 64) in {0, 1}, on the latent grid (nearest)."""
    from PIL import Image

    m = mask.convert("L")
    if m.size != (width, height):
        m = m.resize((width, height), Image.Resampling.LANCZOS)
    t = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]
    t = (t >= 0.5).float()
    t = F.interpolate(t, size=(2 * (height // 16), 2 * (width // 16)))  # nearest, as the reference pipeline
    return pack(t.expand(-1, 16, -1, -1))


def resize_to_area(image: Any, area: int) -> Any:
    """Resize (Lanczos) to about `area` pixels at the image's own aspect, sides multiples of 32 (edit pipelines)."""
    from PIL import Image

    size = calculate_dimensions(area, image.width / image.height)
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def noise_tokens(gen: torch.Generator, gh: int, gw: int, dtype: torch.dtype) -> Tensor:
    """Packed initial noise for a (gh, gw) token grid, drawn as (1, 16, 2gh, 2gw) in the embeddings' dtype: the
    values diffusers' Qwen-Image and FLUX pipelines draw for the same generator (their shapes differ only by a
    frame axis of size 1, which does not change the draw)."""
    return pack(seeded_noise((1, 16, 2 * gh, 2 * gw), gen, dtype))


def run_flow(
    pipe: Any,
    req: GenerateRequest,
    noise_dtype: torch.dtype,
    make_velocity: Callable[[], Velocity],
    init_image: Any = None,
    mask: Any = None,
    progress: Progress | None = None,
) -> Tensor:
    """Denoise one request to packed latent tokens (1, L, 64), fp32: from noise, or img2img / inpaint, with the
    family's velocity field (made once the denoiser is on the device)."""
    dev = pipe.torch_device
    gh, gw = req.height // 16, req.width // 16  # packed token grid
    gen = torch.Generator("cpu").manual_seed(req.seed)
    sigmas = flow_sigmas(req.steps, req.flow_schedule(pipe.schedule), gh * gw).to(dev)
    after_step = None
    if init_image is None:
        x = noise_tokens(gen, gh, gw, noise_dtype).to(dev, torch.float32)
    else:
        mean, logvar = pipe.encode_image(image_to_tensor(init_image, req.width, req.height))
        # The posterior sample is drawn before the noise, from the same generator (diffusers' order).
        eps = seeded_noise((1, mean.shape[1], 2 * gh, 2 * gw), gen, mean.dtype).to(dev)
        z = mean + torch.exp(0.5 * logvar) * eps
        x0 = pack(pipe.vae.normalize(z, reciprocal=True)).float()
        noise = noise_tokens(gen, gh, gw, noise_dtype).to(dev)
        sigmas = sigmas[img2img_start(req.steps, req.strength or 1.0) :]
        x = noise_to(x0, noise, sigmas[0])
        if mask is not None:
            keep = 1.0 - mask_to_tokens(mask, req.width, req.height).to(dev)

            def after_step(i: int, x: Tensor) -> Tensor:
                # Paste the known region back, noised to the level the state has just reached.
                known = noise_to(x0, noise, sigmas[i + 1]) if i + 1 < len(sigmas) - 1 else x0
                return keep * known + (1.0 - keep) * x

    pipe.phase("denoise")
    with modulated(pipe, sigmas):
        return denoise(make_velocity(), x, sigmas, progress, after_step)


@contextlib.contextmanager
def modulated(pipe: Any, sigmas: Tensor) -> Iterator[None]:
    """A denoise over `sigmas` with the denoiser's modulation from its table (runtime/modulation.py), when the
    pipeline has one and the denoiser is whole on its device (a streamed or shared one computes it as before)."""
    table = pipe.modulation
    if table is None or pipe.transformer_offload is not None or pipe.placement_fixed or pipe.parallel is not None:
        yield
        return
    with table.use(sigmas[:-1], pipe.torch_dtype) as on:
        if pipe.denoiser_graphs is not None:  # graphs read the table's tensors: recorded over others, they go
            pipe.denoiser_graphs.within(table.version if on else None)
        yield
