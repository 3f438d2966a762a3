"""qimg: Qwen-Image (and later FLUX.1) on a compact PyTorch engine.

The public API. Importing qimg is cheap: torch and the nets load only when a model is loaded.

    import qimg
    pipe = qimg.load("/models/Qwen-Image", device="cuda")
    image = pipe.generate("a lighthouse at dusk", seed=7, steps=30)[0]
    qimg.save_png(image, "lighthouse.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimg.batch import (
    DEFAULT_NAME_TEMPLATE,
    BatchEvent,
    BatchItem,
    BatchPlan,
    BatchResult,
    PromptFileError,
    PromptLine,
    plan_batch,
    read_prompts,
    run_batch,
)
from qimg.errors import QimgError, UsageError
from qimg.loading.download import DownloadPlan, download, plan_download
from qimg.loading.hub import ModelRef, list_models, resolve_model
from qimg.png import check_output_path, open_image, read_params, save_png
from qimg.request import GenerateRequest, make_request
from qimg.safety import catch_signals, deferred_signals

if TYPE_CHECKING:
    from qimg.embeddings import EmbeddingsFile
    from qimg.pipelines import QwenImagePipeline
    from qimg.runtime.tiling import Tiling

# Public names whose modules import torch: resolved on first use, so `import qimg` stays cheap.
_LAZY = {
    "EmbeddingsFile": "qimg.embeddings",
    "PromptEmbeds": "qimg.embeddings",
    "Tiling": "qimg.runtime.tiling",
    "RoundtripResult": "qimg.roundtrip",
    "check_latents_path": "qimg.roundtrip",
    "load_vae": "qimg.roundtrip",
    "make_tiling": "qimg.roundtrip",
    "save_latents": "qimg.roundtrip",
    "vae_roundtrip": "qimg.roundtrip",
    "psnr": "qimg.metrics",
    "ssim": "qimg.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qimg' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    *_LAZY,
    "DEFAULT_NAME_TEMPLATE",
    "BatchEvent",
    "BatchItem",
    "BatchPlan",
    "BatchResult",
    "PromptFileError",
    "PromptLine",
    "catch_signals",
    "deferred_signals",
    "plan_batch",
    "read_prompts",
    "run_batch",
    "DownloadPlan",
    "GenerateRequest",
    "ModelRef",
    "QimgError",
    "UsageError",
    "check_output_path",
    "download",
    "encode_prompt",
    "generate",
    "list_models",
    "load",
    "load_embeddings",
    "make_request",
    "open_image",
    "plan_download",
    "read_params",
    "resolve_model",
    "save_embeddings",
    "save_png",
    "__version__",
]


def load(
    model: str | ModelRef,
    *,
    device: str | None = None,
    dtype: str | None = None,
    vae_tiling: Tiling | None = None,
    attention: str = "auto",
    compile: bool = False,
    fp8: str | None = None,
    offload: str = "auto",
    vram_budget: float | None = None,
    text_encoder_device: str | None = None,
    plan_for: dict[str, Any] | None = None,
) -> QwenImagePipeline:
    """Load a model folder (diffusers layout) onto `device` (default: cuda if present, else cpu) in `dtype`
    (default: bfloat16 on CUDA, float32 on CPU). Returns a pipeline whose .generate() (text-to-image models) or
    .edit() (edit models) returns PIL images.

    vae_tiling=qimg.Tiling(512, 64) encodes and decodes by tiles; attention picks the kernel (auto, sdpa, cudnn,
    flash, sage; process-wide); compile=True compiles the repeated blocks (slow first call, cached on disk);
    fp8="compute" runs the block linears on FP8 tensor cores (Ada/Hopper), fp8="weights" only stores them in FP8.
    offload (auto, none, model, layer), vram_budget (GiB) and text_encoder_device (cpu, cuda) place the weights
    by a memory plan made before loading (pipe.plan); plan_for gives the request shape it plans for."""
    from qimg.pipelines import load_pipeline

    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    return load_pipeline(ref, device=device, dtype=dtype, vae_tiling=vae_tiling, attention=attention,
                         compile=compile, fp8=fp8, offload=offload, vram_budget=vram_budget,
                         text_encoder_device=text_encoder_device, plan_for=plan_for)


def generate(model: str, prompt: str, *, device: str | None = None, dtype: str | None = None, **options: Any) -> list:
    """One-shot: load `model` and generate from `prompt` (options as QwenImagePipeline.generate)."""
    return load(model, device=device, dtype=dtype).generate(prompt, **options)


def encode_prompt(
    model: str | ModelRef,
    prompt: str,
    *,
    negative: str | None = None,
    images: Sequence[Any] = (),
    max_sequence_length: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> EmbeddingsFile:
    """Encode a prompt (and a negative prompt: the model's default when None) with only the text encoder
    loaded; edit models take their input `images` (PIL) too. Save the result with save_embeddings and use it
    with generate(..., embeddings=...) or edit(..., embeddings=...)."""
    from qimg.pipelines import encode_prompt as _encode

    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    request, _ = make_request(ref.spec, prompt, negative=negative, max_sequence_length=max_sequence_length)
    return _encode(ref, request, images=images, device=device, dtype=dtype)


def load_embeddings(path: str | Path) -> EmbeddingsFile:
    """Read prompt embeddings written by `qimg encode-prompt` (or save_embeddings)."""
    from qimg.embeddings import load_embeddings as _load

    return _load(path)


def save_embeddings(path: str | Path, data: EmbeddingsFile, *, overwrite: bool = False) -> Path:
    """Write prompt embeddings (from QwenImagePipeline.encode_prompts) atomically as safetensors."""
    from qimg.embeddings import save_embeddings as _save

    return _save(path, data, overwrite=overwrite)
