"""Shared by every pipeline: conversions between PIL images and tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qimg.request import calculate_dimensions
from qimg.sampling import pack

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
