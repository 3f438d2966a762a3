"""Qwen-Image glue: prepare (prompt embeddings, noise or init latents, reference latents, schedule, RoPE) ->
denoise -> decode, for text to image, image to image, inpainting and the edit models."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qimg.embeddings import EmbeddingsFile, PromptEmbeds
from qimg.errors import GPUMemoryError, InputError, NumericsError
from qimg.loading import components
from qimg.loading.hub import ModelRef
from qimg.nets.qwen_mmdit import QwenMMDiT, TextPadding, qwen_rope
from qimg.nets.qwen_vae import QwenVAE, denormalize_latents, normalize_latents
from qimg.pipelines import memory
from qimg.pipelines.common import (
    Progress,
    _version,
    image_to_tensor,
    latents_to_images,
    mask_to_tokens,
    pick_device,
    pick_dtype,
)
from qimg.pipelines.prompts import QwenPromptEncoder
from qimg.request import GenerateRequest, calculate_dimensions, img2img_start, make_request
from qimg.runtime.attention import resolve as resolve_attention
from qimg.runtime.attention import use_attention
from qimg.runtime.compile import compile_blocks
from qimg.runtime.fp8 import fp8_supported
from qimg.runtime.offload import Offloaded, Residency
from qimg.runtime.planner import MODES, GiB, MemoryPlan, Needs, PlanError, suggest
from qimg.runtime.tiling import Tiling, decode_tiled, encode_tiled
from qimg.sampling import (
    FlowSchedule,
    Velocity,
    denoise,
    flow_sigmas,
    noise_to,
    pack,
    seeded_noise,
    true_cfg,
    unpack,
)


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
    cfg: float,
    shapes: list[tuple[int, int, int]],
    refs: Tensor | None = None,
    *,
    batch_cfg: bool = True,
) -> Velocity:
    """The model as a velocity field over the target tokens, with true CFG when `uncond` is given.

    shapes: (frames, rows, cols) of the target token grid, then of each reference image; refs: the packed
    reference latents (1, L_ref, 64) appended after the target tokens (edit models), whose predictions are
    dropped. With batch_cfg the conditional and unconditional branches run as one batch of two (every weight is
    read once per step instead of twice); otherwise one after the other (less activation memory). RoPE tables
    and the text batch are built once here, not per step.
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
        return out[0] if len(out) == 1 else true_cfg(out[0], out[1], cfg)

    return velocity


@dataclass
class QwenImagePipeline:
    """A loaded Qwen-Image model (text to image, or edit); build it with qimg.load(). The text encoder loads on
    first use, so runs from saved prompt embeddings never load it."""

    ref: ModelRef
    transformer: QwenMMDiT
    vae: QwenVAE
    schedule: FlowSchedule
    prompts: QwenPromptEncoder
    torch_device: torch.device
    torch_dtype: torch.dtype
    vae_tiling: Tiling | None = None  # encode/decode by blended tiles (large images in little memory)
    plan: MemoryPlan | None = None  # what stays on the GPU, what visits it per phase, what streams
    needs: Needs | None = None
    residency: Residency | None = None
    transformer_offload: Offloaded | None = None
    keep_text_encoder: bool = True  # False: free it once a request's prompts are encoded (single runs)
    fp8: str | None = None
    planned_for: dict[str, Any] | None = None  # the request shape the plan was made for

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def dtype(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")

    @property
    def text_encoder_loaded(self) -> bool:
        return self.prompts.loaded

    def encode_prompts(
        self, request: GenerateRequest, *, with_negative: bool = True, images: Sequence[Any] = ()
    ) -> EmbeddingsFile:
        """The positive and (if asked and given) negative embeddings of a request, with their provenance."""
        return self.prompts.encode_request(request, with_negative=with_negative, images=images)

    @property
    def tiling(self) -> Tiling | None:
        """The VAE tiling asked for, or the default tiles when the memory plan needs them."""
        if self.vae_tiling is None and self.plan is not None and self.plan.vae_tiling:
            return Tiling()
        return self.vae_tiling

    def phase(self, name: str) -> None:
        """Enter a run phase (text, vae, denoise): under an offload plan, move components on and off the GPU."""
        if self.residency is not None:
            self.residency.enter(name)

    def encode_image(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels (B, 3, H, W) in [-1, 1] -> VAE posterior (mean, logvar) in the VAE's latent space."""
        self.phase("vae")
        x = x.to(self.torch_device, self.torch_dtype)
        return self.vae.encode(x) if self.tiling is None else encode_tiled(self.vae, x, self.tiling)

    def decode(self, x: Tensor, height: int, width: int) -> Tensor:
        """Packed latent tokens (B, L, 64) -> images (B, 3, H, W) in [-1, 1]."""
        self.phase("vae")
        z = unpack(x, 2 * (height // 16), 2 * (width // 16)).to(self.torch_dtype)
        z = denormalize_latents(z, self.vae.params)
        return self.vae.decode(z) if self.tiling is None else decode_tiled(self.vae, z, self.tiling)

    def fit(self, request: GenerateRequest, ref_pixels: int = 0) -> None:
        """Re-plan the streamed blocks for this request's size (the load-time plan assumed 1024x1024 with CFG);
        the offload mode chosen at load stays."""
        if self.plan is None or self.plan.mode == "none" or self.needs is None:
            return
        shape = dict(width=request.width, height=request.height, cfg=request.cfg_enabled, ref_pixels=ref_pixels)
        if self.planned_for is not None and all(self.planned_for.get(k) == v for k, v in shape.items()):
            return  # batches of one size plan once
        try:
            plan, needs = memory.make_plan(
                self.ref.path, self.torch_device, self.torch_dtype, self.fp8, task=self.ref.spec.task,
                offload=self.plan.mode, budget_gib=None if self.plan.budget is None else self.plan.budget / GiB,
                text_encoder_device=self.plan.text_encoder_device, vae_tiling=self.vae_tiling is not None,
                text_encoder=self.needs.text_encoder is not None, **shape,
            )
        except PlanError as e:
            raise GPUMemoryError(f"{request.width}x{request.height}: {e}", hint=_fitting_flags(self.fp8)) from None
        if self.transformer_offload is not None:
            self.transformer_offload.stream(plan.streamed.get("transformer", ()))
        self.plan, self.needs, self.planned_for = plan, needs, shape
        if self.residency is not None:
            self.residency.phases = plan.phases

    @contextlib.contextmanager
    def _oom_as_error(self) -> Iterator[None]:
        """A CUDA out-of-memory error becomes one line naming the flags that would fit this GPU."""
        try:
            yield
        except torch.OutOfMemoryError as e:
            raise out_of_memory(self.ref, self.torch_device, self.torch_dtype, self.fp8) from e

    def _request(
        self, prompt: str | None, embeddings: EmbeddingsFile | None, init_size: Any, options: dict[str, Any]
    ) -> GenerateRequest:
        """A request from keyword options; with saved embeddings the prompts default to the ones they hold."""
        if embeddings is not None and prompt is None:
            prompt = embeddings.meta.get("prompt", "")
            options.setdefault("negative", embeddings.meta.get("negative"))
        return make_request(self.ref.spec, prompt or "", init_size=init_size, **options)[0]

    def _conditioning(
        self, request: GenerateRequest, embeddings: EmbeddingsFile | None, images: Sequence[Any] = ()
    ) -> tuple[GenerateRequest, PromptEmbeds, PromptEmbeds | None]:
        """Prompt embeddings from the text encoder, or from a saved file (checked against this model)."""
        if embeddings is None:
            data = self.encode_prompts(request, with_negative=request.cfg_enabled, images=images)
            if not self.keep_text_encoder:
                self.prompts.release()
            return request, data.cond, data.uncond
        self.prompts.check_embeddings(embeddings, images)
        if embeddings.cond.embeds.shape[-1] != self.transformer.params.txt_dim:
            raise InputError(f"prompt embeddings have width {embeddings.cond.embeds.shape[-1]}, "
                             f"this model takes {self.transformer.params.txt_dim}")
        if embeddings.uncond is None:
            request = dataclasses.replace(request, negative=None)  # nothing to guide against
        uncond = embeddings.uncond if request.cfg_enabled else None
        return request, embeddings.cond.to(self.torch_device), uncond and uncond.to(self.torch_device)

    def _finish(self, request: GenerateRequest, x: Tensor, started: float, **extra: Any) -> list[Any]:
        images = latents_to_images(self.decode(x, request.height, request.width))
        params = {
            **request.as_dict(),
            "cfg_enabled": request.cfg_enabled,
            "model": self.ref.name,
            "model_family": self.ref.spec.family,
            "dtype": self.dtype,
            "qimg_version": _version(),
            **extra,
            "seconds": round(time.perf_counter() - started, 3),
        }
        for image in images:
            image.info["qimg"] = params
        return images

    def generate(
        self,
        prompt: str | None = None,
        *,
        request: GenerateRequest | None = None,
        init_image: Any = None,
        mask: Any = None,
        embeddings: EmbeddingsFile | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> list[Any]:
        """Text to image, or image to image with `init_image` (PIL) and options["strength"], inpainting the
        white part of `mask` (PIL) when given. Give a prompt and options (negative, seed, steps, cfg, width,
        height, max_sequence_length, strength), or a prepared `request`; `embeddings` (from encode-prompt)
        replace the text encoder. Returns PIL images; image.info["qimg"] holds the parameters."""
        if self.ref.spec.task != "t2i":
            raise InputError(f"{self.ref.name} is an edit model", hint="use: qimg edit PROMPT -i IMAGE -o OUT.png")
        if request is None:
            init_size = None if init_image is None else init_image.size
            request = self._request(prompt, embeddings, init_size, options)
        if mask is not None and init_image is None:
            raise InputError("a mask needs an init image", hint="pass --init-image together with --mask")
        if init_image is not None and request.strength is None:
            request = dataclasses.replace(request, strength=0.6)
        started = time.perf_counter()
        with torch.inference_mode(), self._oom_as_error():
            self.fit(request)
            request, cond, uncond = self._conditioning(request, embeddings)
            x = run_qwen(self, request, cond, uncond, init_image, mask, progress)
            return self._finish(request, x, started)

    def edit(
        self,
        prompt: str | None = None,
        images: Sequence[Any] = (),
        *,
        request: GenerateRequest | None = None,
        keep_size: bool = False,
        embeddings: EmbeddingsFile | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> list[Any]:
        """Edit `images` (PIL; one for Qwen-Image-Edit, one or more for -2509/-2511) as the prompt says.

        The output size defaults to about 1 MP at the aspect of the last image, as diffusers does; keep_size
        resamples the result to the first image's exact size. Options as generate (no strength)."""
        if self.ref.spec.task != "edit":
            raise InputError(f"{self.ref.name} is a text-to-image model", hint="use: qimg generate PROMPT -o OUT.png")
        self.prompts.check_images(images)
        if request is None:
            request = self._request(prompt, embeddings, images[-1].size if images else None, options)
        started = time.perf_counter()
        with torch.inference_mode(), self._oom_as_error():
            area = self.ref.spec.vae_image_area
            self.fit(request, sum(area for _ in images))
            request, cond, uncond = self._conditioning(request, embeddings, images)
            x = run_qwen_edit(self, request, cond, uncond, images, progress)
            out = self._finish(request, x, started, keep_size=keep_size)
        if keep_size and out[0].size != images[0].size:
            from PIL import Image

            info = out[0].info
            out = [im.resize(images[0].size, Image.Resampling.LANCZOS) for im in out]
            for im in out:
                im.info.update(info)
        return out


def _check_finite(x: Tensor) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        raise NumericsError(
            "the sampler produced NaN or infinite values",
            hint="float16 overflows on this model; use --dtype bfloat16 (CUDA) or float32",
        )
    return x


def _noise_tokens(gen: torch.Generator, gh: int, gw: int, dtype: torch.dtype) -> Tensor:
    # Drawn as (B, frames=1, C, h, w) in the embeddings' dtype, as diffusers does, so seeds agree with it.
    return pack(seeded_noise((1, 1, 16, 2 * gh, 2 * gw), gen, dtype)[:, 0])


def run_qwen(
    pipe: QwenImagePipeline,
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
    sigmas = flow_sigmas(req.steps, pipe.schedule, gh * gw).to(dev)
    after_step = None
    if init_image is None:
        x = _noise_tokens(gen, gh, gw, cond.embeds.dtype).to(dev, torch.float32)
    else:
        mean, logvar = pipe.encode_image(image_to_tensor(init_image, req.width, req.height))
        # The posterior sample is drawn before the noise, from the same generator (diffusers' order).
        eps = seeded_noise((1, 16, 1, 2 * gh, 2 * gw), gen, mean.dtype)[:, :, 0].to(dev)
        z = mean + torch.exp(0.5 * logvar) * eps
        x0 = pack(normalize_latents(z, pipe.vae.params, reciprocal=True)).float()
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
    velocity = qwen_velocity(pipe.transformer, pipe.torch_dtype, cond, uncond, req.cfg, [(1, gh, gw)])
    return _check_finite(denoise(velocity, x, sigmas, progress, after_step))


def run_qwen_edit(
    pipe: QwenImagePipeline,
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
        refs.append(pack(normalize_latents(mean, pipe.vae.params)))
        shapes.append((1, h // 16, w // 16))
    x = _noise_tokens(torch.Generator("cpu").manual_seed(req.seed), gh, gw, cond.embeds.dtype).to(dev, torch.float32)
    sigmas = flow_sigmas(req.steps, pipe.schedule, gh * gw).to(dev)  # mu from the target tokens only
    pipe.phase("denoise")
    velocity = qwen_velocity(pipe.transformer, pipe.torch_dtype, cond, uncond, req.cfg, shapes, torch.cat(refs, 1))
    return _check_finite(denoise(velocity, x, sigmas, progress))


FP8_MODES = ("compute", "weights")


def check_runtime_options(device: torch.device, attention: str, fp8: str | None) -> None:
    """Refuse, before any weight is read, what this machine cannot run (one line each, exit 1)."""
    if fp8 is not None:
        if fp8 not in FP8_MODES:
            raise InputError(f"unknown FP8 mode {fp8!r}", hint=f"use one of {', '.join(FP8_MODES)}")
        if fp8 == "compute" and not fp8_supported(device):
            raise InputError(
                f"--fp8 compute needs an FP8 GPU (Ada or Hopper, compute capability 8.9+); {device} has none",
                hint="use --fp8 weights (FP8 storage, bf16 compute) or leave FP8 off",
            )
    try:
        resolve_attention(attention, device)
    except (ValueError, ImportError) as e:
        raise InputError(str(e), hint="--attention sdpa works everywhere") from e


def load_pipeline(
    ref: ModelRef,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    vae_tiling: Tiling | None = None,
    attention: str = "auto",
    compile: bool = False,
    fp8: str | None = None,
    offload: str = "auto",
    vram_budget: float | None = None,
    text_encoder_device: str | None = None,
    plan_for: dict[str, Any] | None = None,
) -> QwenImagePipeline:
    """Load a Qwen-Image model folder as a memory plan places it (the text encoder follows on first use), then
    apply the runtime features asked for: the attention kernel (process-wide), FP8 linears, regional compile.

    offload: none (all resident), model (one component on the GPU at a time), layer (also stream transformer /
    text-encoder blocks that do not fit), auto (the first that fits). vram_budget (GiB) caps this process's
    CUDA memory and is what the plan fits; without it the plan fits the memory free now. plan_for: the request
    shape to plan for (width, height, cfg, ref_pixels; default 1024x1024 with CFG)."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    check_runtime_options(dev, attention, fp8)
    check_memory_options(dev, offload, vram_budget, text_encoder_device)
    root = ref.path
    try:
        if vram_budget is not None and dev.type == "cuda":
            index = memory.cuda_index(dev)
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, vram_budget * GiB / total), index)
        plan, needs = memory.make_plan(
            root, dev, dt, fp8, task=ref.spec.task, offload=offload, budget_gib=vram_budget,
            text_encoder_device=text_encoder_device, vae_tiling=vae_tiling is not None, **(plan_for or {}),
        )
    except PlanError as e:
        raise GPUMemoryError(str(e), hint=_fitting_flags(fp8)) from None
    try:
        vae = components.load_qwen_vae(root / "vae", device=dev, dtype=dt)
        # channels-last convs: 1.3x faster VAE decode with less memory on an H100 (bench/results/vae_h100.json).
        vae = vae.to(memory_format=torch.channels_last)
        transformer, offloaded = memory.load_transformer(root / "transformer", dev, dt, fp8, plan)
    except torch.OutOfMemoryError as e:
        raise out_of_memory(ref, dev, dt, fp8) from e
    use_attention(attention, dev)
    if compile:
        compile_blocks(transformer)
        vae.decoder.compile()
    residency = None if offloaded is None else Residency({"transformer": offloaded}, plan.phases)
    return QwenImagePipeline(
        ref=ref,
        transformer=transformer,
        vae=vae,
        schedule=components.load_schedule(root / "scheduler"),
        prompts=QwenPromptEncoder(ref, dev, dt, fp8=fp8, plan=plan, residency=residency),
        torch_device=dev,
        torch_dtype=dt,
        vae_tiling=vae_tiling,
        plan=plan,
        needs=needs,
        residency=residency,
        transformer_offload=offloaded,
        fp8=fp8,
        planned_for=plan_for,
    )


def check_memory_options(
    device: torch.device, offload: str, vram_budget: float | None, text_encoder_device: str | None
) -> None:
    if offload not in MODES:
        raise InputError(f"unknown offload mode {offload!r}", hint=f"use one of {', '.join(MODES)}")
    if text_encoder_device not in (None, "cpu", "cuda"):
        raise InputError(f"unknown text encoder device {text_encoder_device!r}", hint="use cpu or cuda")
    if vram_budget is not None and vram_budget <= 0:
        raise InputError(f"--vram-budget {vram_budget} is not a positive number of GiB", hint="e.g. --vram-budget 12")
    if device.type != "cuda" and (offload in ("model", "layer") or vram_budget is not None):
        raise InputError(f"--offload {offload} and --vram-budget manage GPU memory; the device is {device}",
                         hint="leave them off on the CPU, or pass --device cuda")
    if device.type != "cuda" and text_encoder_device == "cuda":
        raise InputError("--text-encoder-device cuda needs a CUDA device", hint="pass --device cuda")


def _fitting_flags(fp8: str | None) -> str:
    hints = ["a larger --vram-budget", "--offload layer"]
    if fp8 is None:
        hints.insert(0, "--fp8 weights")
    return "try " + ", ".join(hints) + " or a smaller --width/--height"


def out_of_memory(ref: ModelRef, device: torch.device, dtype: torch.dtype, fp8: str | None) -> GPUMemoryError:
    """The one-line error for a CUDA out-of-memory: the flags the planner says fit this GPU's memory."""
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(memory.cuda_index(device))
    try:
        needs = memory.qwen_needs(ref.path, dtype, fp8 or "weights", task=ref.spec.task)
        hint = suggest(needs, free, fp8=fp8 is not None)
    except Exception:  # the hint is a courtesy; never let it hide the real error
        hint = "try --offload layer --fp8 weights, --tiled-vae, or a smaller --width/--height"
    return GPUMemoryError(f"the GPU ran out of memory ({free / GiB:.1f} GiB free on {device})", hint=hint)


def encode_prompt(
    ref: ModelRef,
    request: GenerateRequest,
    *,
    images: Sequence[Any] = (),
    with_negative: bool = True,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> EmbeddingsFile:
    """Prompt embeddings for a request (and, for edit models, its input images), loading only the text encoder,
    tokenizer and image processor of the model."""
    dev = pick_device(device)
    encoder = QwenPromptEncoder(ref, dev, pick_dtype(dtype, dev))
    with torch.inference_mode():
        return encoder.encode_request(request, with_negative=with_negative, images=images)
