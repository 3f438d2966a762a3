"""Rectified-flow sampling as pure functions: sigma schedules, seeded noise, packing, CFG and the Euler loop.

The model is any callable velocity(x, sigma) -> v; progress goes through a callback, never a progress bar here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from qimg.specs import FlowSchedule

__all__ = ["FlowSchedule", "calculate_shift", "cfg", "denoise", "euler_step", "flow_sigmas", "noise_to", "pack",
           "seeded_noise", "true_cfg", "unpack"]


def calculate_shift(seq_len: int, s: FlowSchedule) -> float:
    """mu for dynamic shifting: linear in the image token count through (base_len, base_shift), (max_len, max_shift)."""
    m = (s.max_shift - s.base_shift) / (s.max_image_seq_len - s.base_image_seq_len)
    b = s.base_shift - m * s.base_image_seq_len
    return seq_len * m + b


def flow_sigmas(steps: int, s: FlowSchedule, image_seq_len: int) -> Tensor:
    """Sigmas from 1 down to the last step, then a terminal 0: (steps + 1,) fp32.

    Computed in numpy float32 in the order diffusers' FlowMatchEulerDiscreteScheduler uses, so schedules agree
    to the bit: linspace(1, 1/N, N), time shift (exponential or linear with mu from the token count, or the
    static shift), then the stretch that makes the last sigma equal shift_terminal.
    """
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if s.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, s)
        if s.time_shift_type == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        elif s.time_shift_type == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            raise ValueError(f"unknown time_shift_type {s.time_shift_type!r}")
    else:
        sigmas = s.shift * sigmas / (1 + (s.shift - 1) * sigmas)
    # With one step the only sigma is 1 and the stretch divides 0 by 0 (diffusers returns NaN there): skip it.
    if s.shift_terminal and steps > 1:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - s.shift_terminal))
    out = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
    return torch.cat([out, torch.zeros(1)])


def seeded_noise(shape: tuple[int, ...], seed: int | torch.Generator, dtype: torch.dtype) -> Tensor:
    """Gaussian noise from a CPU generator, drawn directly in `dtype`: the same seed gives the same noise on any
    device, and the same values diffusers draws with generator=torch.Generator("cpu").manual_seed(seed).

    Pass a generator instead of a seed to continue one stream across several draws (img2img draws the VAE
    posterior sample first, then the noise, from one generator)."""
    gen = torch.Generator("cpu").manual_seed(seed) if isinstance(seed, int) else seed
    return torch.randn(shape, generator=gen, dtype=dtype)


def noise_to(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The flow-matching forward process: the point at noise level sigma between data x0 and noise, in fp32."""
    return sigma.float() * noise.float() + (1.0 - sigma.float()) * x0.float()


def model_timesteps(sigmas: Tensor, dtype: torch.dtype) -> Tensor:
    """The timesteps a flow model is given for noise levels `sigmas`: through the model dtype before and after
    /1000, as in diffusers (bit parity in bf16)."""
    return (sigmas * 1000).to(dtype) / 1000


def pack(latents: Tensor) -> Tensor:
    """2x2 patchify: (B, C, H, W) -> (B, H/2 * W/2, 4C), channel index c*4 + dy*2 + dx, tokens row-major."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of pack for a latent grid of h x w: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def cfg(cond: Tensor, uncond: Tensor, scale: float, *, norm_rescale: bool = False) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) in fp32. With norm_rescale (Qwen-Image's true CFG) the
    guided velocity keeps the conditional velocity's norm over channels, per token."""
    cond, uncond = cond.float(), uncond.float()
    comb = uncond + scale * (cond - uncond)
    if not norm_rescale:
        return comb
    return comb * (torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
                   / torch.linalg.vector_norm(comb, dim=-1, keepdim=True))


def true_cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Qwen-Image's true CFG: guidance with the per-token norm rescale."""
    return cfg(cond, uncond, scale, norm_rescale=True)


def euler_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One Euler step of the flow ODE dx/dsigma = v, in fp32."""
    return x.float() + (sigma_next - sigma).float() * v.float()


Velocity = Callable[[Tensor, Tensor], Tensor]


def denoise(
    velocity: Velocity,
    x: Tensor,
    sigmas: Tensor,
    callback: Callable[[int, int], None] | None = None,
    after_step: Callable[[int, Tensor], Tensor] | None = None,
) -> Tensor:
    """Integrate from sigmas[0] to sigmas[-1] with Euler steps; x is kept in fp32 between steps.

    velocity(x, sigma) returns the model's velocity for state x at noise level sigma (a 0-d fp32 tensor).
    after_step(i, x) may replace the state after step i (which ends at sigmas[i + 1]), e.g. to paste the known
    region back in when inpainting. callback(i, n) runs after step i of n (1-based), for progress.
    """
    x = x.float()
    n = len(sigmas) - 1
    for i in range(n):
        x = euler_step(x, velocity(x, sigmas[i]), sigmas[i], sigmas[i + 1])
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback(i + 1, n)
    return x
