"""qimg: Qwen-Image (and later FLUX.1) on a compact PyTorch engine.

The public API. Importing qimg is cheap: torch and the nets load only when a model is loaded.

    import qimg
    pipe = qimg.load("/models/Qwen-Image", device="cuda")
    image = pipe.generate("a lighthouse at dusk", seed=7, steps=30)[0]
    qimg.save_png(image, "lighthouse.png")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qimg.errors import QimgError, UsageError
from qimg.loading.hub import ModelRef, resolve_model
from qimg.png import check_output_path, read_params, save_png
from qimg.request import GenerateRequest, make_request

if TYPE_CHECKING:
    from qimg.pipelines import QwenImagePipeline

__version__ = "0.1.0"

__all__ = [
    "GenerateRequest",
    "ModelRef",
    "QimgError",
    "UsageError",
    "check_output_path",
    "generate",
    "load",
    "make_request",
    "read_params",
    "resolve_model",
    "save_png",
    "__version__",
]


def load(model: str | ModelRef, *, device: str | None = None, dtype: str | None = None) -> QwenImagePipeline:
    """Load a model folder (diffusers layout) onto `device` (default: cuda if present, else cpu) in `dtype`
    (default: bfloat16 on CUDA, float32 on CPU). Returns a pipeline whose .generate() returns PIL images."""
    from qimg.pipelines import load_pipeline

    return load_pipeline(model if isinstance(model, ModelRef) else resolve_model(model), device=device, dtype=dtype)


def generate(model: str, prompt: str, *, device: str | None = None, dtype: str | None = None, **options: Any) -> list:
    """One-shot: load `model` and generate from `prompt` (options as QwenImagePipeline.generate)."""
    return load(model, device=device, dtype=dtype).generate(prompt, **options)
