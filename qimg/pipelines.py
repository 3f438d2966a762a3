"""Per-family glue: prepare (prompt embeddings, noise, schedule, RoPE) -> denoise -> decode."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qimg.embeddings import EmbeddingsFile, PromptEmbeds
from qimg.errors import InputError, NumericsError
from qimg.loading import components
from qimg.loading.hub import ModelRef
from qimg.nets.qwen_mmdit import QwenMMDiT, qwen_rope
from qimg.nets.qwen_vae import QwenVAE, denormalize_latents, normalize_latents
from qimg.nets.text_encoders import QWEN_IMAGE_T2I, encode_qwen_prompt
from qimg.request import GenerateRequest, img2img_start, make_request
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

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
Progress = Callable[[int, int], None]


def pick_device(device: str | None) -> torch.device:
    """The requested device, or cuda when present, else cpu; a missing GPU is a clear error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA GPU is visible", hint="use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU unless asked otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


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


def qwen_velocity(
    model: QwenMMDiT,
    dtype: torch.dtype,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None,
    cfg: float,
    shapes: list[tuple[int, int, int]],
    refs: Tensor | None = None,
) -> Velocity:
    """The model as a velocity field over the target tokens, with true CFG when `uncond` is given.

    shapes: (frames, rows, cols) of the target token grid, then of each reference image; refs: the packed
    reference latents (1, L_ref, 64) appended after the target tokens (edit models), whose predictions are
    dropped. RoPE tables are built once here, not per step.
    """
    p = model.params
    dev = cond.embeds.device
    n_target = shapes[0][0] * shapes[0][1] * shapes[0][2]
    branches = []
    for prompt in (cond, uncond) if uncond is not None else (cond,):
        rope = qwen_rope(shapes, prompt.embeds.shape[1], p.axes_dims_rope, p.rope_theta).to(dev)
        branches.append((prompt.embeds.to(dtype), prompt.mask, rope))
    refs_in = None if refs is None else refs.to(dev, dtype)

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        # The timestep passes through the model dtype before and after /1000, as in diffusers (bit parity in bf16).
        t = ((sigma * 1000).to(dtype) / 1000).reshape(1)
        xin = x.to(dtype) if refs_in is None else torch.cat([x.to(dtype), refs_in], dim=1)
        out = [model(xin, e, t, rope, m, n_target=n_target)[:, :n_target] for e, m, rope in branches]
        return out[0] if len(out) == 1 else true_cfg(out[0], out[1], cfg)

    return velocity


@dataclass
class QwenPromptEncoder:
    """Qwen2.5-VL prompt encoding for one model folder; the encoder and tokenizer load on first use."""

    ref: ModelRef
    torch_device: torch.device
    torch_dtype: torch.dtype
    _model: Any = None
    _tokenizer: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = components.load_text_encoder(
                self.ref.path / "text_encoder", device=self.torch_device, dtype=self.torch_dtype
            )
        return self._model

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = components.load_tokenizer(self.ref.path / "tokenizer")
        return self._tokenizer

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def encode(self, prompt: str, max_sequence_length: int = 512) -> PromptEmbeds:
        """Text conditioning for one prompt: embeds (1, L, 3584) and no mask (a single prompt has no padding)."""
        embeds, mask = encode_qwen_prompt(self.model, self.tokenizer, prompt, QWEN_IMAGE_T2I, max_sequence_length)
        return PromptEmbeds(embeds.to(self.torch_device), None if bool(mask.all()) else mask.to(self.torch_device))

    def encode_request(self, request: GenerateRequest, *, with_negative: bool = True) -> EmbeddingsFile:
        """The positive and (if asked and given) negative embeddings of a request, with their provenance."""
        cond = self.encode(request.prompt, request.max_sequence_length)
        uncond = None
        if with_negative and request.negative is not None:
            uncond = self.encode(request.negative, request.max_sequence_length)
        meta = {
            "family": self.ref.spec.family,
            "template": QWEN_IMAGE_T2I.name,
            "model": self.ref.name,
            "text_encoder": components.text_encoder_identity(self.ref.path / "text_encoder"),
            "prompt": request.prompt,
            "negative": request.negative if uncond is not None else None,
            "max_sequence_length": request.max_sequence_length,
            "dtype": str(self.torch_dtype).removeprefix("torch."),
            "qimg_version": _version(),
        }
        return EmbeddingsFile(cond, uncond, meta)


@dataclass
class QwenImagePipeline:
    """A loaded Qwen-Image model; build it with qimg.load(). The text encoder loads on first use, so runs
    from saved prompt embeddings never load it."""

    ref: ModelRef
    transformer: QwenMMDiT
    vae: QwenVAE
    schedule: FlowSchedule
    prompts: QwenPromptEncoder
    torch_device: torch.device
    torch_dtype: torch.dtype

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def dtype(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")

    @property
    def text_encoder_loaded(self) -> bool:
        return self.prompts.loaded

    def encode_prompts(self, request: GenerateRequest, *, with_negative: bool = True) -> EmbeddingsFile:
        """The positive and (if asked and given) negative embeddings of a request, with their provenance."""
        return self.prompts.encode_request(request, with_negative=with_negative)

    def check_embeddings(self, data: EmbeddingsFile) -> None:
        """Refuse embeddings made for another model family or prompt template."""
        family, template = data.meta.get("family"), data.meta.get("template")
        if family != self.ref.spec.family or template != QWEN_IMAGE_T2I.name:
            raise InputError(
                f"these prompt embeddings were made for {family} ({template}), not for {self.ref.spec.family}",
                hint=f"re-create them with: qimg encode-prompt PROMPT --model {self.ref.name}",
            )
        dim = self.transformer.params.txt_dim
        if data.cond.embeds.shape[-1] != dim:
            raise InputError(f"prompt embeddings have width {data.cond.embeds.shape[-1]}, this model takes {dim}")

    def encode_image(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels (B, 3, H, W) in [-1, 1] -> VAE posterior (mean, logvar) in the VAE's latent space."""
        return self.vae.encode(x.to(self.torch_device, self.torch_dtype))

    def decode(self, x: Tensor, height: int, width: int) -> Tensor:
        """Packed latent tokens (B, L, 64) -> images (B, 3, H, W) in [-1, 1]."""
        z = unpack(x, 2 * (height // 16), 2 * (width // 16)).to(self.torch_dtype)
        z = denormalize_latents(z, self.vae.params)
        return self.vae.decode(z)

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
        if request is None:
            init_size = None if init_image is None else init_image.size
            request, _ = make_request(self.ref.spec, prompt or "", init_size=init_size, **options)
        if mask is not None and init_image is None:
            raise InputError("a mask needs an init image", hint="pass --init-image together with --mask")
        if init_image is not None and request.strength is None:
            request = dataclasses.replace(request, strength=0.6)
        started = time.perf_counter()
        with torch.inference_mode():
            if embeddings is not None:
                self.check_embeddings(embeddings)
                if embeddings.uncond is None:
                    request = dataclasses.replace(request, negative=None)  # nothing to guide against
                cond = embeddings.cond.to(self.torch_device)
                uncond = embeddings.uncond.to(self.torch_device) if embeddings.uncond is not None else None
            else:
                data = self.encode_prompts(request, with_negative=request.cfg_enabled)
                cond, uncond = data.cond, data.uncond
            x = run_qwen(self, request, cond, uncond if request.cfg_enabled else None, init_image, mask, progress)
            images = latents_to_images(self.decode(x, request.height, request.width))
        params = {
            **request.as_dict(),
            "cfg_enabled": request.cfg_enabled,
            "model": self.ref.name,
            "model_family": self.ref.spec.family,
            "dtype": self.dtype,
            "qimg_version": _version(),
            "seconds": round(time.perf_counter() - started, 3),
        }
        for image in images:
            image.info["qimg"] = params
        return images


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
    dev, dtype = pipe.torch_device, pipe.torch_dtype
    gh, gw = req.height // 16, req.width // 16  # packed token grid
    gen = torch.Generator("cpu").manual_seed(req.seed)
    sigmas = flow_sigmas(req.steps, pipe.schedule, gh * gw).to(dev)
    after_step = None
    if init_image is None:
        # Drawn as (B, frames=1, C, h, w) in the embeddings' dtype, as diffusers does, so seeds agree with it.
        x = pack(seeded_noise((1, 1, 16, 2 * gh, 2 * gw), gen, cond.embeds.dtype)[:, 0]).to(dev, torch.float32)
    else:
        mean, logvar = pipe.encode_image(image_to_tensor(init_image, req.width, req.height))
        # The posterior sample is drawn before the noise, from the same generator (diffusers' order).
        eps = seeded_noise((1, 16, 1, 2 * gh, 2 * gw), gen, mean.dtype)[:, :, 0].to(dev)
        z = mean + torch.exp(0.5 * logvar) * eps
        x0 = pack(normalize_latents(z, pipe.vae.params, reciprocal=True)).float()
        noise = pack(seeded_noise((1, 1, 16, 2 * gh, 2 * gw), gen, cond.embeds.dtype)[:, 0]).to(dev)
        sigmas = sigmas[img2img_start(req.steps, req.strength or 1.0) :]
        x = noise_to(x0, noise, sigmas[0])
        if mask is not None:
            keep = 1.0 - mask_to_tokens(mask, req.width, req.height).to(dev)

            def after_step(i: int, x: Tensor) -> Tensor:
                # Paste the known region back, noised to the level the state has just reached.
                known = noise_to(x0, noise, sigmas[i + 1]) if i + 1 < len(sigmas) - 1 else x0
                return keep * known + (1.0 - keep) * x

    velocity = qwen_velocity(pipe.transformer, dtype, cond, uncond, req.cfg, [(1, gh, gw)])
    x = denoise(velocity, x, sigmas, progress, after_step)
    if not bool(torch.isfinite(x).all()):
        raise NumericsError(
            "the sampler produced NaN or infinite values",
            hint="float16 overflows on this model; use --dtype bfloat16 (CUDA) or float32",
        )
    return x


def _version() -> str:
    from qimg import __version__

    return __version__


def load_pipeline(
    ref: ModelRef, *, device: str | None = None, dtype: str | torch.dtype | None = None
) -> QwenImagePipeline:
    """Load a Qwen-Image model folder onto one device (the text encoder follows on first use)."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    root = ref.path
    return QwenImagePipeline(
        ref=ref,
        transformer=components.load_qwen_mmdit(root / "transformer", device=dev, dtype=dt),
        vae=components.load_qwen_vae(root / "vae", device=dev, dtype=dt),
        schedule=components.load_schedule(root / "scheduler"),
        prompts=QwenPromptEncoder(ref, dev, dt),
        torch_device=dev,
        torch_dtype=dt,
    )


def encode_prompt(
    ref: ModelRef,
    request: GenerateRequest,
    *,
    with_negative: bool = True,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> EmbeddingsFile:
    """Prompt embeddings for a request, loading only the text encoder and tokenizer of the model."""
    dev = pick_device(device)
    with torch.inference_mode():
        return QwenPromptEncoder(ref, dev, pick_dtype(dtype, dev)).encode_request(request, with_negative=with_negative)
