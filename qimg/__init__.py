"""qimg: Qwen-Image (and later FLUX.1) on a compact PyTorch engine.

The public API. Importing qimg is cheap: torch and the nets load only when a model is loaded.

    import qimg
    pipe = qimg.load("/models/Qwen-Image", device="cuda")
    image = pipe.generate("a lighthouse at dusk", seed=7, steps=30)[0]
    qimg.save_png(image, "lighthouse.png")
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimg.batch import (
    DEFAULT_NAME_TEMPLATE,
    BatchEvent,
    BatchItem,
    BatchPlan,
    BatchResult,
    plan_batch,
    run_batch,
)
from qimg.errors import QimgError, UsageError
from qimg.jobs import (
    Job,
    check_loras,
    check_prompt_inputs,
    parse_lora,
    prepare_edit,
    prepare_generate,
    preset_hints,
    replay,
)
from qimg.launch import gpu_count, launch_ranks, without_option
from qimg.loading.download import DownloadPlan, download, plan_download, quiet_loggers
from qimg.loading.hub import ModelRef, list_models, resolve_lora, resolve_model
from qimg.png import check_output_path, open_image, read_image, read_params, save_png
from qimg.presets import PRESETS, Preset
from qimg.prompt_files import PromptFileError, PromptLine, read_prompts
from qimg.request import GenerateRequest, make_request
from qimg.runtime.options import RuntimeOptions, Tiling
from qimg.runtime.planner import RequestShape
from qimg.safety import catch_signals, deferred_signals
from qimg.specs import PROMPT_TOKEN_LIMIT
from qimg.training.config import TrainConfig, read_config_file
from qimg.version import __version__

if TYPE_CHECKING:
    from qimg.embeddings import EmbeddingsFile
    from qimg.pipelines.base import Pipeline
    from qimg.runtime.planner import RequestShape

# Public names whose modules import torch: resolved on first use, so `import qimg` stays cheap.
_LAZY = {
    "EmbeddingsFile": "qimg.embeddings",
    "PromptEmbeds": "qimg.embeddings",
    "Pipeline": "qimg.pipelines.base",
    "QwenImagePipeline": "qimg.pipelines.qwen",
    "RoundtripResult": "qimg.roundtrip",
    "check_latents_path": "qimg.roundtrip",
    "make_tiling": "qimg.roundtrip",
    "save_latents": "qimg.roundtrip",
    "vae_roundtrip": "qimg.roundtrip",
    "psnr": "qimg.metrics",
    "ssim": "qimg.metrics",
    "TransformerFile": "qimg.loading.single_file",
    "BenchResult": "qimg.benchmarking",
    "World": "qimg.runtime.distributed",
    "BatchShard": "qimg.runtime.distributed",
    "world_from_env": "qimg.runtime.distributed",
    "local_device": "qimg.runtime.distributed",
    "leave_world": "qimg.runtime.distributed",
    "bench_job": "qimg.benchmarking",
    "benchmark": "qimg.benchmarking",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qimg' has no attribute {name!r}")


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
    "gpu_count",
    "launch_ranks",
    "without_option",
    "DownloadPlan",
    "GenerateRequest",
    "Job",
    "RequestShape",
    "RuntimeOptions",
    "Tiling",
    "edit",
    "inspect_lora",
    "inspect_transformer",
    "with_transformer",
    "load_vae",
    "prepare_edit",
    "prepare_generate",
    "replay",
    "ModelRef",
    "QimgError",
    "UsageError",
    "check_loras",
    "check_output_path",
    "download",
    "encode_prompt",
    "generate",
    "list_models",
    "load",
    "load_embeddings",
    "make_request",
    "open_image",
    "parse_lora",
    "preset_hints",
    "PRESETS",
    "PROMPT_TOKEN_LIMIT",
    "Preset",
    "plan_download",
    "quiet_loggers",
    "read_image",
    "read_params",
    "resolve_lora",
    "train_lora",
    "TrainConfig",
    "read_config_file",
    "resolve_model",
    "save_embeddings",
    "save_png",
    "__version__",
]


def _options(options: RuntimeOptions | None, overrides: dict[str, Any]) -> RuntimeOptions:
    """RuntimeOptions from an object, keyword overrides (load(model, device="cuda")), or both."""
    base = options if options is not None else RuntimeOptions()
    return base.replace(**overrides) if overrides else base


def load(
    model: str | ModelRef,
    options: RuntimeOptions | None = None,
    *,
    shape: RequestShape | None = None,
    transformer: str | Path | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
    **overrides: Any,
) -> Pipeline:
    """Load a model (a name, repo id or folder in the diffusers layout) as its family's pipeline, whose
    .generate() (text-to-image models) or .edit() (edit models) returns PIL images.

    options (RuntimeOptions, or its fields as keywords: device, dtype, attention, compile, fp8, offload,
    vram_budget, text_encoder_device, vae_tiling) say how it runs; shape (RequestShape: size, CFG, reference
    pixels) is what the memory plan is made for, default 1024x1024 with CFG (pipe.plan). transformer: one
    safetensors file (diffusers or ComfyUI layout, bf16 or FP8) whose weights replace the model's transformer
    weights (see with_transformer); pipe.notes says what loading did with its FP8 tensors. loras: (path, scale)
    pairs to apply from the start; options.lora_mode "auto" (the default) and "merge" fold them into the weights
    as they load (no per-step cost; they then stay for the pipeline's life), "branch" attaches them as side
    branches that pipe.set_lora_scale / unload_lora / apply_loras can change. pipe.load_lora after loading
    always attaches a side branch."""
    from qimg import families

    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    if transformer is not None:
        ref = with_transformer(ref, transformer)
    return families.load(ref, _options(options, overrides), shape, loras)


def train_lora(
    config: Any,
    run_dir: str | Path,
    options: RuntimeOptions | None = None,
    *,
    resume: bool = False,
    typed: Sequence[str] | None = None,
    on_event: Any = None,
) -> Path:
    """Train a LoRA as `config` (qimg.training.trainer.TrainConfig) says, in the folder `run_dir` (cache, state,
    log.csv, lora.safetensors); returns the LoRA file. The data is checked whole before the model loads. resume:
    continue the run saved in `run_dir`: its fixed settings (model, data, rank, alpha, targets, seed, resolution,
    batch size) are the saved ones, and one of `typed` (the settings the caller chose; None: all) that differs is
    an error. on_event(dict) hears "cached", "step" and "saved" events."""
    from qimg import families
    from qimg.runtime.devices import pick_device
    from qimg.safety import folder_lock
    from qimg.training.data import bucket_for
    from qimg.training.memory import training_plan
    from qimg.training.sharding import plan_sharding
    from qimg.training.trainer import Trainer, read_state, resumed_config, train_items

    run_dir = Path(run_dir).expanduser()
    state = read_state(run_dir) if run_dir.is_dir() else None
    if resume:
        if state is None:
            raise UsageError(f"{run_dir} holds no training state to resume", hint="start the run without --resume")
        config = resumed_config(config, state, typed)
    elif state is not None or (run_dir / "lora.safetensors").exists():
        raise UsageError(f"{run_dir} already holds a training run",
                         hint="add --resume to continue it, or pass another -o")
    ref = resolve_model(config.model)
    items = train_items(config, ref)
    largest = max((bucket_for(i.width, i.height, max_pixels=config.max_pixels) for i in items),
                  key=lambda size: size[0] * size[1])
    options = options or RuntimeOptions()
    # Under torchrun: data parallel (Trainer shares each step out), with a copy of the frozen model per rank or
    # (config.shard_base, or a model that fits one GPU only by streaming blocks) the model sharded over them.
    world = None
    if "WORLD_SIZE" in os.environ:
        from qimg.runtime.distributed import init_world, local_device, world_from_env

        world = world_from_env()
    if world is not None:
        init_world(world)
        options = options.replace(device=local_device(world, options.device))
        on_event = on_event if world.leader else None  # rank 0 reports for the job
    family = families.get(ref.spec.family)
    plan, needs, sharded = plan_sharding(
        config, None if world is None else world.size,
        lambda shards: training_plan(ref, family, config, options, items, shards=shards))
    if on_event is not None:
        on_event({"event": "plan", "lines": plan.describe(needs)})
    if plan.streamed or (sharded and pick_device(options.device).type == "cuda"):
        options = options.replace(offload="layer")  # loaded into pinned host memory, never whole on the device
    with folder_lock(run_dir, create=True) if world is None or world.leader else contextlib.nullcontext():
        controls = max(len(i.controls) for i in items)
        pipe = load(ref, options, shape=RequestShape(width=largest[0], height=largest[1], cfg=False,
                                                     ref_pixels=controls * ref.spec.vae_image_area))
        trainer = Trainer(config, run_dir, pipe, on_event=on_event, world=world, sharded=sharded)
        trainer.prepare(items, resume=state if resume else None, plan=plan)
        path = trainer.run()
    if world is not None:
        from qimg.runtime.distributed import leave_world

        leave_world()  # together, after a run that went well
    return path


def with_transformer(model: str | Path | ModelRef, path: str | Path | None) -> ModelRef:
    """`model` with its transformer weights taken from one safetensors file (None: the folder's own); the file's
    header is checked now (layout, family, formats), its tensors against the network when the model loads."""
    from qimg.loading.single_file import with_transformer as _with

    return _with(model, path)


def inspect_transformer(path: str | Path, model: str | ModelRef | None = None) -> Any:
    """A transformer file as qimg reads it (layout, tensors, FP8 format; .summary() is one line), checked against
    `model`'s family (default Qwen-Image); nothing is loaded."""
    from qimg.loading.single_file import read_transformer_file

    ref = None if model is None else model if isinstance(model, ModelRef) else resolve_model(model)
    return read_transformer_file(path, "qwen-image" if ref is None else ref.spec.family)


def _split(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the RuntimeOptions fields (device, dtype, fp8, ...) out of a one-shot call's keywords."""
    fields = {f.name for f in dataclasses.fields(RuntimeOptions)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in fields}


def generate(model: str | ModelRef, prompt: str | None = None, options: RuntimeOptions | None = None,
             **kwargs: Any) -> list:
    """One-shot text to image: prepare, load (planned for this request) and run. kwargs: prepare_generate's,
    transformer (a single-file transformer, see with_transformer), and RuntimeOptions fields (device, dtype, fp8,
    ...) on top of `options`."""
    runtime = _split(kwargs)
    transformer = kwargs.pop("transformer", None)
    if transformer is not None:
        model = with_transformer(model, transformer)
    job = prepare_generate(model, prompt, **kwargs)
    return load(job.ref, options, shape=job.shape, **runtime).run(job)


def edit(model: str | ModelRef, prompt: str | None, images: Sequence[Any], options: RuntimeOptions | None = None,
         **kwargs: Any) -> list:
    """One-shot edit of `images` (paths or PIL): prepare, load and run. kwargs: prepare_edit's, transformer, and
    RuntimeOptions fields on top of `options`."""
    runtime = _split(kwargs)
    transformer = kwargs.pop("transformer", None)
    if transformer is not None:
        model = with_transformer(model, transformer)
    job = prepare_edit(model, prompt, images, **kwargs)
    return load(job.ref, options, shape=job.shape, **runtime).run(job)


def encode_prompt(
    model: str | ModelRef,
    prompt: str,
    *,
    negative: str | None = None,
    images: Sequence[Any] = (),
    max_sequence_length: int | None = None,
    options: RuntimeOptions | None = None,
    **overrides: Any,
) -> EmbeddingsFile:
    """Encode a prompt (and a negative prompt: the model's default when None) with only the text encoder
    loaded; edit models take their input `images` (PIL) too. Save the result with save_embeddings and use it
    with generate(..., embeddings=...) or edit(..., embeddings=...)."""
    from qimg import families

    ref = check_prompt_inputs(model, len(images))
    request, _ = make_request(ref.spec, prompt, negative=negative, max_sequence_length=max_sequence_length)
    return families.encode_prompt(ref, _options(options, overrides), request, images)


def inspect_lora(path: str | Path, model: str | ModelRef | None = None) -> Any:
    """Read a LoRA file as qimg would apply it (dialect, ranks, alphas, targets, keys that match nothing) against
    `model`'s transformer config, or the released Qwen-Image architecture; nothing is loaded. See
    LoRAFile.describe()."""
    from qimg import families

    ref = None if model is None else model if isinstance(model, ModelRef) else resolve_model(model)
    return families.inspect_lora(path, ref)


def load_vae(model: str | ModelRef, options: RuntimeOptions | None = None, **overrides: Any) -> Any:
    """Only the VAE of a model, as its family runs it (for vae_roundtrip)."""
    from qimg import families

    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    return families.load_vae(ref, _options(options, overrides))


def load_embeddings(path: str | Path) -> EmbeddingsFile:
    """Read prompt embeddings written by `qimg encode-prompt` (or save_embeddings)."""
    from qimg.embeddings import load_embeddings as _load

    return _load(path)


def save_embeddings(path: str | Path, data: EmbeddingsFile, *, overwrite: bool = False) -> Path:
    """Write prompt embeddings (from QwenImagePipeline.encode_prompts) atomically as safetensors."""
    from qimg.embeddings import save_embeddings as _save

    return _save(path, data, overwrite=overwrite)
