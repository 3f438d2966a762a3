"""Per-family glue: prepare (prompt embeddings, noise, schedule, RoPE) -> denoise -> decode."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qimg.errors import InputError, NumericsError
from qimg.loading import components
from qimg.loading.hub import ModelRef
from qimg.nets.qwen_mmdit import QwenMMDiT, qwen_rope
from qimg.nets.qwen_vae import QwenVAE, denormalize_latents
from qimg.nets.text_encoders import QWEN_IMAGE_T2I, encode_qwen_prompt
from qimg.request import GenerateRequest, make_request
from qimg.sampling import FlowSchedule, denoise, flow_sigmas, pack, seeded_noise, true_cfg, unpack

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


@dataclass
class QwenImagePipeline:
    """A loaded Qwen-Image text-to-image model; build it with qimg.load()."""

    ref: ModelRef
    transformer: QwenMMDiT
    vae: QwenVAE
    text_encoder: Any
    tokenizer: Any
    schedule: FlowSchedule
    torch_device: torch.device
    torch_dtype: torch.dtype

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def dtype(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")

    def encode_prompt(self, prompt: str, max_sequence_length: int = 512) -> tuple[Tensor, Tensor | None]:
        """(embeds (1, L, 3584), mask or None when no token is padding)."""
        embeds, mask = encode_qwen_prompt(
            self.text_encoder, self.tokenizer, prompt, QWEN_IMAGE_T2I, max_sequence_length
        )
        return embeds.to(self.torch_device), (None if bool(mask.all()) else mask.to(self.torch_device))

    def generate(
        self,
        prompt: str | None = None,
        *,
        request: GenerateRequest | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> list[Any]:
        """Text to image. Give a prompt and options (negative, seed, steps, cfg, width, height,
        max_sequence_length), or a prepared `request`. Returns PIL images; image.info["qimg"] holds the parameters."""
        if request is None:
            request, _ = make_request(self.ref.spec, prompt or "", **options)
        started = time.perf_counter()
        with torch.inference_mode():
            x = run_qwen_t2i(self, request, progress)
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

    def decode(self, x: Tensor, height: int, width: int) -> Tensor:
        """Packed latent tokens (B, L, 64) -> images (B, 3, H, W) in [-1, 1]."""
        z = unpack(x, 2 * (height // 16), 2 * (width // 16)).to(self.torch_dtype)
        z = denormalize_latents(z, self.vae.params)
        return self.vae.decode(z)


def run_qwen_t2i(pipe: QwenImagePipeline, req: GenerateRequest, progress: Progress | None = None) -> Tensor:
    """Denoise one request to packed latent tokens (1, L, 64), fp32."""
    dev, dtype, model = pipe.torch_device, pipe.torch_dtype, pipe.transformer
    cond = pipe.encode_prompt(req.prompt, req.max_sequence_length)
    uncond = pipe.encode_prompt(req.negative, req.max_sequence_length) if req.cfg_enabled else None
    embeds_dtype = cond[0].dtype

    gh, gw = req.height // 16, req.width // 16  # packed token grid
    # Drawn as (B, frames=1, C, h, w) in the embeddings' dtype, as diffusers does, so seeds agree with it.
    noise = seeded_noise((1, 1, 16, 2 * gh, 2 * gw), req.seed, embeds_dtype)[:, 0]
    x = pack(noise).to(dev, torch.float32)
    sigmas = flow_sigmas(req.steps, pipe.schedule, x.shape[1]).to(dev)
    shapes = [(1, gh, gw)]
    rope_c = qwen_rope(shapes, cond[0].shape[1], model.params.axes_dims_rope, model.params.rope_theta).to(dev)
    rope_u = None
    if uncond is not None:
        rope_u = qwen_rope(shapes, uncond[0].shape[1], model.params.axes_dims_rope, model.params.rope_theta).to(dev)

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        # The timestep passes through the model dtype before and after /1000, as in diffusers (bit parity in bf16).
        t = ((sigma * 1000).to(dtype) / 1000).reshape(1)
        xin = x.to(dtype)
        v = model(xin, cond[0].to(dtype), t, rope_c, cond[1])
        if uncond is not None:
            v = true_cfg(v, model(xin, uncond[0].to(dtype), t, rope_u, uncond[1]), req.cfg)
        return v

    x = denoise(velocity, x, sigmas, progress)
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
    """Load every component of a Qwen-Image model folder onto one device."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    root = ref.path
    return QwenImagePipeline(
        ref=ref,
        transformer=components.load_qwen_mmdit(root / "transformer", device=dev, dtype=dt),
        vae=components.load_qwen_vae(root / "vae", device=dev, dtype=dt),
        text_encoder=components.load_text_encoder(root / "text_encoder", device=dev, dtype=dt),
        tokenizer=components.load_tokenizer(root / "tokenizer"),
        schedule=components.load_schedule(root / "scheduler"),
        torch_device=dev,
        torch_dtype=dt,
    )
