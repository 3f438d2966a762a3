"""FLUX.1 glue: prepare (prompt embeddings, noise or init latents, schedule, RoPE ids) -> denoise, for text to
image, image to image, inpainting (FLUX.1-dev) and in-context editing (FLUX.1-Kontext-dev). The flow-matching run
is the one every family shares (pipelines/common.run_flow); FLUX brings its velocity: the distilled guidance
fed to the model, optional true CFG without a norm rescale, the pooled CLIP vector, and 3-axis RoPE ids.
Loading, phases, decoding and the public calls are the shared Pipeline's (pipelines/base.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from qimg.embeddings import EmbeddingsFile, PromptEmbeds
from qimg.errors import InputError
from qimg.nets.flux import FluxTransformer, flux_ids, flux_rope
from qimg.pipelines.base import Pipeline
from qimg.pipelines.common import Progress, image_to_tensor, noise_tokens, run_flow
from qimg.pipelines.flux_prompts import FluxPromptEncoder
from qimg.request import GenerateRequest, input_size
from qimg.sampling import Velocity, cfg, denoise, flow_sigmas, model_timesteps, pack

if TYPE_CHECKING:
    from qimg.runtime.sequence_parallel import ParallelPlan


def flux_velocity(
    model: FluxTransformer,
    dtype: torch.dtype,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    scale: float,
    guidance: float | None,
    grids: Sequence[tuple[int, int, int]],
    refs: Tensor | None = None,
    *,
    batch_cfg: bool = True,
    parallel: ParallelPlan | None = None,
    forward: Callable[..., Tensor] | None = None,
) -> Velocity:
    """The model as a velocity field over the target tokens, with true CFG (no norm rescale) when `uncond` is
    given. grids: (frame id, rows, cols) of the target token grid, then of each reference image (Kontext: frame
    id 1); refs: their packed latents (1, L_ref, 64), appended after the target tokens, predictions dropped. The
    RoPE table and the text batch are built once here. guidance: the distilled guidance scale (None for models
    without a guidance embedder). parallel: this process's part in one image shared by several
    (runtime/sequence_parallel.py). forward: what is called in the model's place (its CUDA-graph replays,
    runtime/graphs.py), the model itself by default."""
    dev = cond.embeds.device
    n_target = grids[0][1] * grids[0][2]
    prompts = [cond] if uncond is None else [cond, uncond]
    groups = [prompts] if batch_cfg else [[q] for q in prompts]
    txt_len = cond.embeds.shape[1]
    if uncond is not None and uncond.embeds.shape[1] != txt_len:
        raise InputError("the prompt and negative embeddings have different lengths",
                         hint="encode both with the same max_sequence_length")
    p = model.params
    rope = flux_rope(flux_ids(txt_len, grids), p.axes_dims_rope, p.rope_theta).to(dev)
    calls = [(torch.cat([q.embeds for q in group]).to(dtype), torch.cat([q.pooled for q in group]).to(dtype))
             for group in groups]
    g = None
    if p.guidance_embeds:
        g = torch.full((1,), 1.0 if guidance is None else guidance, dtype=torch.float32, device=dev)
    refs_in = None if refs is None else refs.to(dev, dtype)
    if parallel is not None:
        return _parallel_velocity(model, dtype, prompts, scale, g, rope, n_target, refs_in, parallel)
    call = model if forward is None else forward

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        t = model_timesteps(sigma, dtype).reshape(1)
        xin = x.to(dtype) if refs_in is None else torch.cat([x.to(dtype), refs_in], dim=1)
        out = []
        for txt, pooled in calls:
            b = txt.shape[0]
            v = call(xin.expand(b, -1, -1), txt, t.expand(b), None if g is None else g.expand(b), pooled, rope)
            out.extend(v[:, :n_target].split(1))
        return out[0] if len(out) == 1 else cfg(out[0], out[1], scale, norm_rescale=False)

    return velocity


def _parallel_velocity(model: FluxTransformer, dtype: torch.dtype, prompts: list[PromptEmbeds], scale: float,
                       g: Tensor | None, rope: Tensor, n_target: int, refs_in: Tensor | None,
                       parallel: ParallelPlan) -> Velocity:
    """flux_velocity's field with the CFG branches on their ranks and each branch's tokens over its sequence
    group."""
    from qimg.runtime.sequence_parallel import cfg_branches, check_heads, on_tokens  # torch.distributed

    check_heads(parallel, model.params.num_attention_heads)
    branches = [(q.embeds.to(dtype), q.pooled.to(dtype)) for q in prompts]

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        t = model_timesteps(sigma, dtype).reshape(1)
        xin = x.to(dtype) if refs_in is None else torch.cat([x.to(dtype), refs_in], dim=1)

        def branch(i: int) -> Tensor:
            txt, pooled = branches[i]
            return on_tokens(parallel, lambda a, c, r: model(a, c, t, g, pooled, r), xin, txt, rope)[:, :n_target]

        out = cfg_branches(parallel, len(branches), branch)
        return out[0] if len(out) == 1 else cfg(out[0], out[1], scale, norm_rescale=False)

    return velocity


class FluxPipeline(Pipeline):
    """A loaded FLUX.1 model (text to image, or Kontext editing); build it with qimg.load()."""

    prompt_encoder = FluxPromptEncoder

    def denoise_image(self, request: GenerateRequest, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                      init_image: Any, mask: Any, progress: Progress | None) -> Tensor:
        gh, gw = request.height // 16, request.width // 16

        def velocity() -> Velocity:
            return flux_velocity(self.transformer, self.torch_dtype, cond, uncond, request.cfg, request.guidance,
                                 [(0, gh, gw)], parallel=self.parallel, forward=self.denoiser_forward)

        return run_flow(self, request, cond.embeds.dtype, velocity, init_image, mask, progress)

    def denoise_edit(self, request: GenerateRequest, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                     images: Sequence[Any], progress: Progress | None) -> Tensor:
        """Kontext: the input image, at the training resolution nearest its aspect (request.input_size),
        VAE-encoded (posterior mode)
        and packed, follows the noisy tokens with frame id 1; its predictions are dropped."""
        dev = self.torch_device
        gh, gw = request.height // 16, request.width // 16
        grids, refs = [(0, gh, gw)], []
        for image in images:
            w, h = input_size(self.ref.spec, image.width, image.height)
            mean, _ = self.encode_image(image_to_tensor(image, w, h))
            refs.append(pack(self.vae.normalize(mean)))
            grids.append((1, h // 16, w // 16))
        x = noise_tokens(torch.Generator("cpu").manual_seed(request.seed), gh, gw, cond.embeds.dtype)
        x = x.to(dev, torch.float32)
        sigmas = flow_sigmas(request.steps, request.flow_schedule(self.schedule), gh * gw).to(dev)
        self.phase("denoise")
        velocity = flux_velocity(self.transformer, self.torch_dtype, cond, uncond, request.cfg, request.guidance,
                                 grids, torch.cat(refs, 1), parallel=self.parallel, forward=self.denoiser_forward)
        return denoise(velocity, x, sigmas, progress)

    def check_embeddings(self, embeddings: EmbeddingsFile, images: Sequence[Any] = ()) -> None:
        self.prompts.check_embeddings(embeddings, images)
        width, takes = embeddings.cond.embeds.shape[-1], self.transformer.params.joint_attention_dim
        if width != takes:
            raise InputError(f"prompt embeddings have width {width}, this model takes {takes}")
        if embeddings.cond.pooled is None:
            raise InputError("these prompt embeddings have no pooled CLIP vector, which FLUX.1 needs",
                             hint="encode them again with qimg encode-prompt --model for this FLUX model")
