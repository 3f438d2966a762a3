"""Load each component of a diffusers-layout model folder: configs to params, weights strictly into our nets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qimg.errors import CheckpointError, ConfigError, ModelNotFoundError
from qimg.loading import keymaps
from qimg.loading.checkpoint import load_module, params_from_config, read_json, safetensors_files
from qimg.loading.qwen_text import LaterHook, LayerHook, load_qwen_text_encoder
from qimg.nets.qwen_mmdit import QwenMMDiT
from qimg.nets.qwen_vae import QwenVAE
from qimg.specs import FlowSchedule, QwenMMDiTParams, QwenVAEParams

# Scheduler options that change the sigmas in ways qimg's schedule does not implement.
_UNSUPPORTED_SCHEDULER_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                                "stochastic_sampling")


def qwen_mmdit_params(folder: Path) -> QwenMMDiTParams:
    config = read_json(folder / "config.json")
    for flag in keymaps.QWEN_MMDIT_UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise ConfigError(f"{folder}/config.json sets {flag}, a variant qimg does not run yet",
                              hint="use Qwen-Image, -2512 or an Edit model")
    ignored = (*keymaps.QWEN_MMDIT_CONFIG_IGNORED, *keymaps.QWEN_MMDIT_UNSUPPORTED_FLAGS)
    where = f"{folder}/config.json"
    return params_from_config(QwenMMDiTParams, config, keymaps.QWEN_MMDIT_CONFIG, ignored, where=where,
                              required=keymaps.QWEN_MMDIT_CONFIG_REQUIRED)


def load_qwen_mmdit(folder: Path, *, device: torch.device | str, dtype: torch.dtype, **grouping: Any) -> QwenMMDiT:
    """transformer/: config.json and diffusion_pytorch_model(.safetensors | -NNNNN-of-NNNNN + index).
    grouping: load_module's group / on_group (block-by-block loading)."""
    params = qwen_mmdit_params(folder)
    model = load_module(lambda: QwenMMDiT(params), safetensors_files(folder), device=device, dtype=dtype,
                        what=f"{folder.name}/ weights", **grouping)
    return model.eval().requires_grad_(False)


def qwen_vae_params(folder: Path) -> QwenVAEParams:
    return params_from_config(QwenVAEParams, read_json(folder / "config.json"), keymaps.QWEN_VAE_CONFIG,
                              keymaps.QWEN_VAE_CONFIG_IGNORED, where=f"{folder}/config.json",
                              required=keymaps.QWEN_VAE_CONFIG_REQUIRED)


def load_qwen_vae(folder: Path, *, device: torch.device | str, dtype: torch.dtype) -> QwenVAE:
    """vae/: AutoencoderKLQwenImage's config.json and 3-D weights, loaded into the 2-D single-image net."""
    params = qwen_vae_params(folder)
    model = load_module(lambda: QwenVAE(params), safetensors_files(folder), device=device, dtype=dtype,
                        transform=keymaps.qwen_vae_tensor, known_unused=keymaps.QWEN_VAE_KNOWN_UNUSED,
                        what=f"{folder.name}/ weights")
    return model.eval().requires_grad_(False)


def load_schedule(folder: Path) -> FlowSchedule:
    """scheduler/scheduler_config.json -> FlowSchedule (only the flow-match Euler scheduler is supported)."""
    config = read_json(folder / "scheduler_config.json")
    cls = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if cls != "FlowMatchEulerDiscreteScheduler":
        raise ConfigError(f"scheduler {cls} is not supported", hint="qimg samples with flow-match Euler")
    on = [flag for flag in _UNSUPPORTED_SCHEDULER_FLAGS if config.get(flag)]
    if on:
        raise ConfigError(f"scheduler_config.json enables {', '.join(on)}, which qimg does not implement")
    fields = FlowSchedule.__dataclass_fields__
    return FlowSchedule(**{k: v for k, v in config.items() if k in fields and v is not None})


def require_safetensors_model(folder: Path) -> None:
    """A transformers model folder holds model.safetensors (or its index and every shard it names), else one line.
    transformers falls back to pytorch_model.bin when no safetensors are there, and a pickle can run code: refuse
    the folder before transformers looks at it (use_safetensors=True is the second lock on the same door)."""
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        pickles = sorted(p.name for ext in ("bin", "pt", "pth", "ckpt") for p in folder.glob(f"*.{ext}"))
        only = f", only {', '.join(pickles[:2])}" if pickles else ""
        raise CheckpointError(
            f"no model.safetensors in {folder}{only}; qimg reads safetensors only and never unpickles",
            hint="re-download the model's safetensors weights (qimg download fetches only those)",
        )
    safetensors_files(folder, stem="model")


def load_text_encoder(folder: Path, *, device: torch.device | str | None, dtype: torch.dtype, vision: bool = True,
                      head: bool = True, on_layer: LayerHook | None = None, later: LaterHook | None = None,
                      read_to: torch.device | str = "cpu") -> Any:
    """text_encoder/: Qwen2.5-VL, from safetensors only (a pickle is refused unread), read layer by layer and
    strictly (loading/qwen_text.py) into `read_to`'s memory; on_layer(kind, i, module) sees each layer as it
    arrives. vision / head False leave out the vision tower / LM head unread. device None leaves each layer where
    on_layer put it. later: the decoder layers are left unread, each handed over with its reader."""
    require_safetensors_model(folder)
    model = load_qwen_text_encoder(folder, dtype=dtype, vision=vision, head=head, on_layer=on_layer, later=later,
                                   read_to=read_to)
    return model if device is None else model.to(device)


# Tokenizers already read, by folder and the size and time of each of its files: building the Qwen2 tokenizer
# from its 7 MB tokenizer.json takes ~1.6 s of CPU, paid again by every pipeline a process loads (a library user
# switching models, a test suite). A changed file changes the key. Encoding sets truncation per call, so one
# instance serves every pipeline.
_TOKENIZERS: dict[tuple[Any, ...], Any] = {}
_TOKENIZERS_KEPT = 4


def _cached_tokenizer(kind: str, folder: Path, read: Callable[[], Any]) -> Any:
    """read() once per kind of tokenizer and unchanged folder (the _TOKENIZERS cache)."""
    key = _folder_key(folder)
    if key is None:
        return read()
    key = (kind, *key)
    if key not in _TOKENIZERS:
        tokenizer = read()
        while len(_TOKENIZERS) >= _TOKENIZERS_KEPT:
            del _TOKENIZERS[next(iter(_TOKENIZERS))]
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


def load_tokenizer(folder: Path) -> Any:
    """tokenizer/: the Qwen2 tokenizer; a damaged or foreign file is one line naming it."""
    return _cached_tokenizer("transformers", folder, lambda: _read_tokenizer(folder))


def _read_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        # A broken JSON file is named, not the error deep inside transformers; parsed only now, because a
        # tokenizer.json runs to megabytes and transformers parses it anyway (twice).
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                read_json(folder / name)
        raise ConfigError(f"{folder} does not hold a readable tokenizer ({type(e).__name__}: {str(e)[:120]})",
                          hint="re-download the model") from e


class TokenizerFile:
    """A tokenizer.json read by the `tokenizers` library alone, the Rust tokenizer that transformers' fast
    tokenizers wrap: the same ids for the same text (Qwen2's adds no special tokens of its own), without importing
    transformers (seconds) or its three passes over the 7-18 MB file (about 1.5 s on a 2-core CPU, against 0.55 s
    here). Text-to-image prompts need nothing else; edit prompts, which interleave image tokens, use transformers'."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def ids(self, text: str) -> list[int]:
        return self.backend.encode(text).ids


def load_tokenizer_file(folder: Path) -> TokenizerFile:
    """tokenizer/tokenizer.json as a TokenizerFile (cached like load_tokenizer); a missing or broken file is one
    line naming it."""
    return _cached_tokenizer("file", folder, lambda: _read_tokenizer_file(folder / "tokenizer.json"))


def _read_tokenizer_file(path: Path) -> TokenizerFile:
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing",
                                 hint="point --model at a complete model folder (diffusers layout)")
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises its own exception type for a file it cannot parse
        raise ConfigError(f"{path} is not a readable tokenizer ({type(e).__name__}: {str(e)[:120]})",
                          hint="re-download the model") from e
    backend.no_truncation()  # the caller cuts; a file's own settings must not
    backend.no_padding()
    return TokenizerFile(backend)


def _folder_key(folder: Path) -> tuple[str, tuple[tuple[str, int, int], ...]] | None:
    """The folder and (name, size, mtime) of each file in it; None when it cannot be listed (not cached)."""
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
        return str(folder.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return None


def load_image_processor(folder: Path) -> Any:
    """processor/: the image processor its preprocessor_config.json names, as the PIL variant (no torchvision)."""
    import transformers

    config = read_json(folder / "preprocessor_config.json")
    name = str(config.get("image_processor_type", "Qwen2VLImageProcessor")).removesuffix("Fast").removesuffix("Pil")
    # transformers 5.x has a torchvision class and a "...Pil" twin per processor; in 4.x the plain class is the PIL one.
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name, None)
    if cls is None:
        raise ConfigError(f"{folder}/preprocessor_config.json names {name}, which this transformers does not have",
                          hint="upgrade transformers")
    # The edit prompt expands each image placeholder by its grid (t*h*w / merge_size**2): only processors that
    # return image_grid_thw, the Qwen2-VL kind, fit.
    if "image_grid_thw" not in getattr(cls, "model_input_names", ()):
        raise ConfigError(f"{folder}/preprocessor_config.json names {name}, not a Qwen2-VL image processor",
                          hint="edit models ship the Qwen2-VL processor; re-download the model")
    return cls.from_pretrained(folder)


def text_encoder_identity(folder: Path) -> str:
    """A short fingerprint of text_encoder/config.json, recorded with saved prompt embeddings."""
    import hashlib

    raw = (folder / "config.json").read_bytes()
    return f"{json.loads(raw).get('_name_or_path', '')}#{hashlib.sha256(raw).hexdigest()[:16]}"
