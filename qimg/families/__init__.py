"""Model families, one record each (qimg/families/<family>.py), found by the spec's `family` name. Records load
on first use, so `import qimg` imports no torch. A new family is a new module and one line in RECORDS."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimg.errors import ConfigError

if TYPE_CHECKING:
    from qimg.embeddings import EmbeddingsFile
    from qimg.loading.hub import ModelRef
    from qimg.loading.lora import LoRAFile
    from qimg.pipelines.base import Pipeline
    from qimg.pipelines.family import Family
    from qimg.request import GenerateRequest
    from qimg.runtime.options import RuntimeOptions
    from qimg.runtime.planner import RequestShape

# family name -> "module:attribute" of its record
RECORDS: dict[str, str] = {
    "qwen-image": "qimg.families.qwen:QWEN_IMAGE",
    "flux": "qimg.families.flux:FLUX",
}


def get(name: str) -> Family:
    """The record of a family, by the name its specs carry."""
    if name not in RECORDS:
        raise ConfigError(f"model family {name!r} is not supported", hint=f"qimg runs: {', '.join(RECORDS)}")
    module, _, attribute = RECORDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def load(ref: ModelRef, options: RuntimeOptions, shape: RequestShape | None = None,
         loras: Sequence[tuple[str | Path, float]] = ()) -> Pipeline:
    """The family's pipeline for a resolved model, loaded as `options` say, its memory planned for `shape`, with
    `loras` ((path, scale) pairs) merged or attached as options.lora_mode says."""
    family = get(ref.spec.family)
    return family.pipeline.load(ref, family, options, shape, loras)


def load_vae(ref: ModelRef, options: RuntimeOptions) -> Any:
    """Only the vae/ component of a model, as its family runs it."""
    from qimg.runtime.devices import pick_device, pick_dtype

    dev = pick_device(options.device)
    return get(ref.spec.family).load_vae(ref.path / "vae", dev, pick_dtype(options.dtype, dev))


def encode_prompt(ref: ModelRef, options: RuntimeOptions, request: GenerateRequest, images: Sequence[Any] = ()
                  ) -> EmbeddingsFile:
    """Prompt embeddings for a request, loading only the model's text encoder(s)."""
    family = get(ref.spec.family)
    return family.encode_prompt(ref, options, request, images, family=family)


def inspect_lora(path: str | Path, model: ModelRef | None = None, family: str = "qwen-image") -> LoRAFile:
    """Read a LoRA file against a model's denoiser (its config only, nothing loaded), or without a model against
    the family's released architecture."""
    from qimg.loading.lora import read_lora

    record = get(model.spec.family if model is not None else family)
    folder = None if model is None else model.path / record.denoiser_folder
    return read_lora(path, record.denoiser_linears(folder), record.name)
