"""Qwen-Image glue: prepare (prompt embeddings, noise or init latents, reference latents, schedule, RoPE) ->
denoise, for text to image, image to image, inpainting and the edit models. Loading, phases, decoding and the
public calls are the shared Pipeline's (pipelines/base.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qimg.embeddings import EmbeddingsFile, PromptEmbeds
from qimg.errors import InputError
from qimg.nets.qwen_mmdit import QwenMMDiT, TextPadding, qwen_rope
from qimg.pipelines.base import Pipeline
from qimg.pipelines.common import Progress, image_to_tensor, mask_to_tokens
from qimg.pipelines.prompts import QwenPromptEncoder
from qimg.request import GenerateRequest, calculate_dimensions, img2img_start
from qimg.sampling import Velocity, cfg, denoise, flow_sigmas, noise_to, pack, seeded_noise


def text_batch(prompts: Sequence[PromptEmbeds], dtype: torch.dtype) -> tuple[Tensor, TextPadding | None]:
    """Stack prompt embeddings (1, L_i, D) into one batch padded to the longest.

    Rows of different length come with a TextPadding, so each row attends over its own real tokens (as it
    would alone) without an attention mask. Single prompts are never padded (their mask is all ones).
    """
    longest = max(p.embeds.shape[1] for p in prompts)
    rows = [F.pad(p.embeds.to(dtype), (0, 0, 0, longest - p.embeds.shape[1])) for p in prompts]
    lengths = tuple(p.embeds.shape[1] for p in prompts)
    return torch.cat(rows), (None if all(n == longest for n in lengths) else TextPadding(lengths))


def qwen_velocity(
    model: QwenMMDiT,
    dtype: torch.dtype,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    scale: float,
    shapes: list[tuple[int, int, int]],
    refs: Tensor | None = None,
    *,
    batch_cfg: bool = True,
    norm_rescale: bool = True,
) -> Velocity:
    """The model as a velocity field over the target tokens, with true CFG when `uncond` is given.

    shapes: (frames, rows, cols) of the target token grid, then of each reference image; refs: the packed
    reference latents (1, L_ref, 64) appended after the target tokens (edit models), whose predictions are
    dropped. With batch_cfg the conditional and unconditional branches run as one batch of two (every weight is
    read once per step instead of twice); otherwise one after the other (less activation memory). RoPE tables
    and the text batch are built once here, not per step. norm_rescale: Qwen-Image's true CFG (the family's).
    """
    p = model.params
    dev = cond.embeds.device
    n_target = shapes[0][0] * shapes[0][1] * shapes[0][2]
    prompts = [cond] if uncond is None else [cond, uncond]
    groups = [prompts] if batch_cfg else [[q] for q in prompts]
    calls = []
    for group in groups:
        txt, mask = text_batch(group, dtype)
        calls.append((txt, mask, qwen_rope(shapes, txt.shape[1], p.axes_dims_rope, p.rope_theta).to(dev)))
    refs_in = None if refs is None else refs.to(dev, dtype)

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        # The timestep passes through the model dtype before and after /1000, as in diffusers (bit parity in bf16).
        t = ((sigma * 1000).to(dtype) / 1000).reshape(1)
        xin = x.to(dtype) if refs_in is None else torch.cat([x.to(dtype), refs_in], dim=1)
        out = []
        for txt, mask, rope in calls:
            b = txt.shape[0]
            v = model(xin.expand(b, -1, -1), txt, t.expand(b), rope, mask, n_target=n_target)
            out.extend(v[:, :n_target].split(1))
        return out[0] if len(out) == 1 else cfg(out[0], out[1], scale, norm_rescale=norm_rescale)

    return velocity


class QwenImagePipeline(Pipeline):
    """A loaded Qwen-Image model (text to image, or edit); build it with qimg.load()."""

    prompt_encoder = QwenPromptEncoder

    def denoise_image(self, request: GenerateRequest, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                      init_image: Any, mask: Any, progress: Progress | None) -> Tensor:
        return run_qwen(self, request, cond, uncond, init_image, mask, progress)

    def denoise_edit(self, request: GenerateRequest, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                     images: Sequence[Any], progress: Progress | None) -> Tensor:
        return run_qwen_edit(self, request, cond, uncond, images, progress)

    def check_embeddings(self, embeddings: EmbeddingsFile, images: Sequence[Any] = ()) -> None:
        self.prompts.check_embeddings(embeddings, images)
        width, takes = embeddings.cond.embeds.shape[-1], self.transformer.params.txt_dim
        if width != takes:
            raise InputError(f"prompt embeddings have width {width}, this model takes {takes}")


def _noise_tokens(gen: torch.Generator, gh: int, gw: int, dtype: torch.dtype) -> Tensor:
    # Drawn as (B, frames=1, C, h, w) in the embeddings' dtype, as diffusers does, so seeds agree with it.
    return pack(seeded_noise((1, 1, 16, 2 * gh, 2 * gw), gen, dtype)[:, 0])


def run_qwen(
    pipe: Pipeline,
    req: GenerateRequest,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    init_image: Any = None,
    mask: Any = None,
    progress: Progress | None = None,
) -> Tensor:
    """Denoise one request to packed latent tokens (1, L, 64), fp32: from noise, or img2img / inpaint."""
    dev = pipe.torch_device
    gh, gw = req.height // 16, req.width // 16  # packed token grid
    gen = torch.Generator("cpu").manual_seed(req.seed)
    sigmas = flow_sigmas(req.steps, req.flow_schedule(pipe.schedule), gh * gw).to(dev)
    after_step = None
    if init_image is None:
        x = _noise_tokens(gen, gh, gw, cond.embeds.dtype).to(dev, torch.float32)
    else:
        mean, logvar = pipe.encode_image(image_to_tensor(init_image, req.width, req.height))
        # The posterior sample is drawn before the noise, from the same generator (diffusers' order).
        eps = seeded_noise((1, 16, 1, 2 * gh, 2 * gw), gen, mean.dtype)[:, :, 0].to(dev)
        z = mean + torch.exp(0.5 * logvar) * eps
        x0 = pack(pipe.vae.normalize(z, reciprocal=True)).float()
        noise = _noise_tokens(gen, gh, gw, cond.embeds.dtype).to(dev)
        sigmas = sigmas[img2img_start(req.steps, req.strength or 1.0) :]
        x = noise_to(x0, noise, sigmas[0])
        if mask is not None:
            keep = 1.0 - mask_to_tokens(mask, req.width, req.height).to(dev)

            def after_step(i: int, x: Tensor) -> Tensor:
                # Paste the known region back, noised to the level the state has just reached.
                known = noise_to(x0, noise, sigmas[i + 1]) if i + 1 < len(sigmas) - 1 else x0
                return keep * known + (1.0 - keep) * x

    pipe.phase("denoise")
    velocity = qwen_velocity(pipe.transformer, pipe.torch_dtype, cond, uncond, req.cfg, [(1, gh, gw)],
                            norm_rescale=pipe.family.cfg_norm_rescale)
    return denoise(velocity, x, sigmas, progress, after_step)


def run_qwen_edit(
    pipe: Pipeline,
    req: GenerateRequest,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    images: Sequence[Any],
    progress: Progress | None = None,
) -> Tensor:
    """Denoise an edit request: each input image, VAE-encoded (posterior mode) at about the spec's VAE area,
    joins the sequence after the noisy tokens with its own RoPE frame; predictions for it are dropped."""
    dev = pipe.torch_device
    gh, gw = req.height // 16, req.width // 16
    refs, shapes = [], [(1, gh, gw)]
    for image in images:
        w, h = calculate_dimensions(pipe.ref.spec.vae_image_area, image.width / image.height)
        mean, _ = pipe.encode_image(image_to_tensor(image, w, h))
        refs.append(pack(pipe.vae.normalize(mean)))
        shapes.append((1, h // 16, w // 16))
    x = _noise_tokens(torch.Generator("cpu").manual_seed(req.seed), gh, gw, cond.embeds.dtype).to(dev, torch.float32)
    sigmas = flow_sigmas(req.steps, req.flow_schedule(pipe.schedule), gh * gw).to(dev)  # mu from the target tokens only
    pipe.phase("denoise")
    velocity = qwen_velocity(pipe.transformer, pipe.torch_dtype, cond, uncond, req.cfg, shapes, torch.cat(refs, 1),
                            norm_rescale=pipe.family.cfg_norm_rescale)
    return denoise(velocity, x, sigmas, progress)
