"""Qwen-Image glue: prepare (prompt embeddings, noise or init latents, reference latents, schedule, RoPE) ->
denoise, for text to image, image to image, inpainting and the edit models. Loading, phases, decoding and the
public calls are the shared Pipeline's (pipelines/base.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qimg.embeddings import EmbeddingsFile, PromptEmbeds
from qimg.errors import InputError
from qimg.nets.qwen_mmdit import QwenMMDiT, TextPadding, qwen_rope
from qimg.pipelines.base import Pipeline
from qimg.pipelines.common import Progress, image_to_tensor, modulated, noise_tokens, run_flow
from qimg.pipelines.prompts import QwenPromptEncoder
from qimg.request import GenerateRequest, calculate_dimensions
from qimg.sampling import Velocity, cfg, denoise, flow_sigmas, model_timesteps, pack

if TYPE_CHECKING:
    from qimg.runtime.sequence_parallel import ParallelPlan


def text_batch(prompts: Sequence[PromptEmbeds], dtype: torch.dtype) -> tuple[Tensor, TextPadding | None]:
    """Stack prompt embeddings (1, L_i, D) into one batch padded to the longest.

    Rows of different length come with a TextPadding, so each row attends over its own real tokens (as it
    would alone) without an attention mask. Single prompts are never padded (their mask is all ones).
    """
    longest = max(p.embeds.shape[1] for p in prompts)
    rows = [F.pad(p.embeds.to(dtype), (0, 0, 0, longest - p.embeds.shape[1])) for p in prompts]
    lengths = tuple(p.embeds.shape[1] for p in prompts)
    return torch.cat(rows), (None if all(n == longest for n in lengths) else TextPadding(lengths))


def table_timesteps(sigmas: Tensor, dtype: torch.dtype, model: QwenMMDiT) -> Tensor:
    """What the MMDiT's time embedding sees over a run from `sigmas`: a zero_cond_t model adds t = 0 (its
    reference tokens' timestep)."""
    t = model_timesteps(sigmas, dtype)
    return torch.cat([t, t.new_zeros(1)]) if model.params.zero_cond_t else t


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
    parallel: ParallelPlan | None = None,
    forward: Callable[..., Tensor] | None = None,
) -> Velocity:
    """The model as a velocity field over the target tokens, with true CFG when `uncond` is given.

    shapes: (frames, rows, cols) of the target token grid, then of each reference image; refs: the packed
    reference latents (1, L_ref, 64) appended after the target tokens (edit models), whose predictions are
    dropped. With batch_cfg the conditional and unconditional branches run as one batch of two (every weight is
    read once per step instead of twice); otherwise one after the other (less activation memory). RoPE tables
    and the text batch are built once here, not per step. norm_rescale: Qwen-Image's true CFG (the family's).
    parallel: this process's part in one image shared by several (runtime/sequence_parallel.py); every rank
    then returns the same velocity. forward: what is called in the model's place (its CUDA-graph replays,
    runtime/graphs.py), the model itself by default.
    """
    if parallel is not None:
        return _parallel_velocity(model, dtype, cond, uncond, scale, shapes, refs, norm_rescale, parallel)
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
    call = model if forward is None else forward

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        t = model_timesteps(sigma, dtype).reshape(1)
        xin = x.to(dtype) if refs_in is None else torch.cat([x.to(dtype), refs_in], dim=1)
        out = []
        for txt, mask, rope in calls:
            b = txt.shape[0]
            v = call(xin.expand(b, -1, -1), txt, t.expand(b), rope, mask, n_target=n_target)
            out.extend(v[:, :n_target].split(1))
        return out[0] if len(out) == 1 else cfg(out[0], out[1], scale, norm_rescale=norm_rescale)

    return velocity


def _parallel_velocity(model: QwenMMDiT, dtype: torch.dtype, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                       scale: float, shapes: list[tuple[int, int, int]], refs: Tensor | None, norm_rescale: bool,
                       parallel: ParallelPlan) -> Velocity:
    """qwen_velocity's field with the branches on their CFG ranks and each branch's tokens over its sequence
    group; a branch is one prompt (batch 1, never padded, so attention needs no mask)."""
    from qimg.runtime.sequence_parallel import cfg_branches, check_heads, on_tokens  # torch.distributed

    p = model.params
    check_heads(parallel, p.num_heads)
    dev = cond.embeds.device
    n_target = shapes[0][0] * shapes[0][1] * shapes[0][2]
    branches = []
    for prompt in [cond] if uncond is None else [cond, uncond]:
        txt = prompt.embeds.to(dtype)
        branches.append((txt, qwen_rope(shapes, txt.shape[1], p.axes_dims_rope, p.rope_theta).to(dev)))
    refs_in = None if refs is None else refs.to(dev, dtype)

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        t = model_timesteps(sigma, dtype).reshape(1)
        xin = x.to(dtype) if refs_in is None else torch.cat([x.to(dtype), refs_in], dim=1)

        def branch(i: int) -> Tensor:
            txt, rope = branches[i]
            v = on_tokens(parallel, lambda a, c, r, **kw: model(a, c, t, r, None, **kw), xin, txt, rope,
                          n_target=n_target)
            return v[:, :n_target]

        out = cfg_branches(parallel, len(branches), branch)
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
    gh, gw = req.height // 16, req.width // 16  # packed token grid

    def velocity() -> Velocity:
        return qwen_velocity(pipe.transformer, pipe.torch_dtype, cond, uncond, req.cfg, [(1, gh, gw)],
                             norm_rescale=pipe.family.cfg_norm_rescale, parallel=pipe.parallel,
                             forward=pipe.denoiser_forward)

    return run_flow(pipe, req, cond.embeds.dtype, velocity, init_image, mask, progress)


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
    x = noise_tokens(torch.Generator("cpu").manual_seed(req.seed), gh, gw, cond.embeds.dtype).to(dev, torch.float32)
    sigmas = flow_sigmas(req.steps, req.flow_schedule(pipe.schedule), gh * gw).to(dev)  # mu from the target tokens only
    pipe.phase("denoise")
    velocity = qwen_velocity(pipe.transformer, pipe.torch_dtype, cond, uncond, req.cfg, shapes, torch.cat(refs, 1),
                            norm_rescale=pipe.family.cfg_norm_rescale, parallel=pipe.parallel,
                            forward=pipe.denoiser_forward)
    with modulated(pipe, sigmas):
        return denoise(velocity, x, sigmas, progress)
