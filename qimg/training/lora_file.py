"""The LoRA file `qimg train-lora` writes: one safetensors file that qimg (loading/lora.py), diffusers
(QwenImagePipeline.load_lora_weights) and ComfyUI all apply as the same delta W = alpha / rank * up @ down.

Three key layouts, one row each in FORMATS:
  diffusers  transformer.<module>.lora_A.weight / .lora_B.weight; alpha in the `lora_adapter_metadata` header as
             diffusers' save_lora_weights writes it ("transformer."-prefixed LoraConfig fields, as JSON);
  comfy      diffusion_model.<module>.lora_A.weight / .lora_B.weight / .alpha (0-d);
  kohya      lora_unet_<module, "." -> "_">.lora_down.weight / .lora_up.weight / .alpha (0-d).
For FLUX, comfy and kohya spell modules with BFL's names, as ComfyUI and sd-scripts do, a double block's q, k, v (and a
single block's q, k, v and MLP input) fused into one adapter (lora_file_flux.py); diffusers keeps diffusers' names.
diffusers (FluxPipeline) reads the FLUX diffusers and kohya files, not the comfy one (no FLUX converter of its takes
diffusion_model. keys with lora_A / lora_B): that one is for ComfyUI (and qimg).
Alpha is always stored: without it every reader falls back to alpha = rank (scale 1), which is wrong whenever the
trainer's alpha is not its rank. It is stored exactly once: diffusers' Qwen-Image loader bakes an `.alpha` tensor
into the matrices and would then apply the header's lora_alpha on top, so a file never holds both.

Writes are atomic: the file appears whole or not at all, and an existing file is only ever replaced whole.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from qimg.errors import CheckpointError, OutputError, QimgError
from qimg.loading.keymaps import LORA_FAMILY_NAMES
from qimg.loading.lora import PEFT_COMPONENT, PEFT_METADATA_KEY, LoRAModule, read_lora
from qimg.training.lora_file_flux import bfl_part, fuse_bfl, kohya_dropped

__all__ = ["FORMATS", "check_saved", "save_lora"]


@dataclass(frozen=True)
class LoRAFormat:
    """One way of writing a LoRA's keys (a row of FORMATS)."""

    dialect: str  # the dialect read_lora reports for such a file (keymaps.LORA_DIALECTS)
    prefix: str
    underscored: bool  # kohya spells the module path with "_" for "."; readers map it back via the model's names
    down: str  # key suffixes
    up: str
    alpha: str | None  # suffix of the per-module 0-d alpha tensor; None: alpha lives in the PEFT header instead
    bfl: bool  # FLUX: BFL's module names, fused where BFL fuses (what ComfyUI and sd-scripts read and write)

    def stem(self, module: str) -> str:
        return self.prefix + (module.replace(".", "_") if self.underscored else module)


FORMATS: dict[str, LoRAFormat] = {
    "diffusers": LoRAFormat("diffusers", "transformer.", False, ".lora_A.weight", ".lora_B.weight", None, False),
    "comfy": LoRAFormat("comfy", "diffusion_model.", False, ".lora_A.weight", ".lora_B.weight", ".alpha", True),
    "kohya": LoRAFormat("kohya", "lora_unet_", True, ".lora_down.weight", ".lora_up.weight", ".alpha", True),
}
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_FORMAT_KEY, _RANK_KEY, _ALPHA_KEY = "qimg.format", "qimg.rank", "qimg.alpha"
# "format": "pt" is what diffusers (and transformers) stamp on every safetensors file they write.
_RESERVED = ("format", PEFT_METADATA_KEY, _FORMAT_KEY, _RANK_KEY, _ALPHA_KEY)
_BLOCK_PREFIX = re.compile(r"^[A-Za-z_]\w*\.\d+\.")  # "transformer_blocks.3."
_HINT_RESAVE = "save the LoRA again; if it fails again, report it as a qimg bug"


def save_lora(path: str | Path, modules: Mapping[str, tuple[Tensor, Tensor]], *, rank: int, alpha: float,
              fmt: str = "diffusers", family: str = "qwen-image",
              linears: Mapping[str, tuple[int, int]] | None = None, metadata: Mapping[str, str] | None = None,
              dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a LoRA file atomically; returns its path.

    modules: denoiser module name ("transformer_blocks.3.attn.to_q") -> (down (rank, in), up (out, rank)), as trained.
    fmt: a key of FORMATS. family: the denoiser's ("qwen-image", "flux"); for "flux" the comfy and kohya formats
    write BFL's fused names. linears: the denoiser's nn.Linear names -> (out_features, in_features), as for
    check_saved; when given, every module must be one of them, shapes matching, and it sizes the zero blocks of a
    FLUX fused module trained only in part (without it such a module is refused). metadata: the caller's training
    settings (strings), stored in the header next to qimg.format, qimg.rank and qimg.alpha (rank and alpha of each
    trained linear). Bad arguments raise ValueError and write nothing; a failed write leaves no file behind (and any
    file already at `path` as it was), an OS error raising OutputError.
    """
    layout = FORMATS.get(fmt) if isinstance(fmt, str) else None
    if layout is None:
        raise ValueError(f"unknown LoRA format {fmt!r}; known: {', '.join(FORMATS)}")
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        # every reader (qimg, ComfyUI's lora folder, diffusers by weight_name) finds LoRAs by this suffix
        raise ValueError(f"a LoRA file is saved as .safetensors, not {path.name!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, not {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        # kohya and qimg read alpha 0 as "none" (alpha = rank) while PEFT reads it as scale 0: never write one
        raise ValueError(f"alpha must be a positive finite number, not {alpha!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"LoRA matrices are stored as {', '.join(_DTYPES.values())}, not {dtype}")
    if family not in LORA_FAMILY_NAMES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(LORA_FAMILY_NAMES)}")
    if not modules:
        raise ValueError("no modules to save: a LoRA needs at least one adapted linear")

    stored = {module: _stored_pair(module, pair, rank, dtype) for module, pair in modules.items()}
    if linears is not None:
        _check_fit(stored, linears)
    # file module name -> (down, up, its alpha); a fused module of n parts has rank n * rank, hence alpha n * alpha
    written: dict[str, tuple[Tensor, Tensor, float]] = {}
    if family == "flux" and layout.bfl:
        for name, (down, up, n) in fuse_bfl(stored, rank, linears).items():
            if layout.dialect == "kohya" and kohya_dropped(name):
                # train-lora trains the blocks only; a file diffusers would apply in part is never written
                raise ValueError(f"diffusers drops the kohya adapter of {name} (only double_blocks and "
                                 "single_blocks load); save it in the diffusers format, or comfy for ComfyUI")
            written[name] = (down, up, n * float(alpha))
    else:
        written = {module: (down, up, float(alpha)) for module, (down, up) in stored.items()}
    tensors: dict[str, Tensor] = {}
    for module, (down, up, module_alpha) in written.items():
        stem = layout.stem(module)
        if stem + layout.down in tensors:
            raise ValueError(f"two modules are both written as {stem!r} in the {fmt} format (one is {module!r})")
        tensors[stem + layout.down], tensors[stem + layout.up] = down, up
        if layout.alpha is not None:
            # fp32 whatever the matrices' dtype: a bf16 alpha would round values like 0.3 or 257
            tensors[stem + layout.alpha] = torch.tensor(module_alpha, dtype=torch.float32)

    _write_atomically(path, tensors, _header(fmt, layout, modules, rank, alpha, metadata, linears))
    return path


def check_saved(path: str | Path, linears: Mapping[str, tuple[int, int]], family: str = "qwen-image") -> None:
    """Read a file save_lora wrote back the way `qimg generate --lora` reads it, and raise CheckpointError (one line)
    unless every key matches a linear of the model, the file holds exactly the keys its format writes for the
    modules read, each reads back with the rank and alpha its header states, and at least one up matrix is nonzero.
    linears: the denoiser's nn.Linear names -> (out_features, in_features). For a FLUX comfy or kohya file the keys
    are BFL's fused names; the reader splits each fused adapter into its parts, and each part must read back with
    the header's rank and alpha, which only the block-diagonal layout save_lora writes (alpha n * alpha) gives."""
    path = Path(path)
    shown = _show(path)
    try:
        lora = read_lora(path, linears, family)
    except CheckpointError:
        raise
    except QimgError as e:  # e.g. no key matches the model: for a file just written, a damaged checkpoint
        raise CheckpointError(str(e), hint=e.hint) from None

    meta = lora.metadata
    layout = FORMATS.get(meta.get(_FORMAT_KEY, ""))
    if layout is None:
        raise CheckpointError(f"{shown} has no {_FORMAT_KEY} header naming one of {', '.join(FORMATS)}",
                              hint="check_saved checks files that save_lora wrote")
    if lora.unmatched:
        count = len(lora.unmatched)
        raise CheckpointError(f"{shown}: {count} key{'s' if count > 1 else ''} match{'' if count > 1 else 'es'} no "
                              f"linear of the {family} denoiser (first {_show(lora.unmatched[0])})", hint=_HINT_RESAVE)
    expected: set[str] = set()
    bfl = family == "flux" and layout.bfl
    for module in lora.modules:
        part = bfl_part(module) if bfl else None
        if bfl and part is None:
            raise CheckpointError(f"{shown}: {module} has no BFL name, so save_lora cannot have written it",
                                  hint=_HINT_RESAVE)
        stem = layout.stem(module if part is None else part.module)
        expected.update(stem + s for s in (layout.down, layout.up, layout.alpha) if s is not None)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        keys = set(handle.keys())
    if keys != expected:
        extra, missing = sorted(keys - expected), sorted(expected - keys)
        what = f"holds {_show(extra[0])}" if extra else f"lacks {_show(missing[0])}"
        raise CheckpointError(f"{shown} {what}: its keys are not the {meta[_FORMAT_KEY]} layout of the "
                              f"{len(lora.modules)} modules it adapts", hint=_HINT_RESAVE)
    try:
        rank, alpha = int(meta[_RANK_KEY]), float(meta[_ALPHA_KEY])
    except (KeyError, ValueError):
        raise CheckpointError(f"{shown}: its {_RANK_KEY} / {_ALPHA_KEY} header is missing or not a number",
                              hint=_HINT_RESAVE) from None
    for module, adapter in lora.modules.items():
        # fp32 alpha tensors round the stated alpha; anything further off means a reader applies another scale
        if not isinstance(adapter, LoRAModule) or adapter.rank != rank or not math.isclose(
                adapter.alpha, alpha, rel_tol=1e-6):
            got = f"rank {adapter.file_rank}, alpha {adapter.file_alpha}"
            raise CheckpointError(f"{shown}: {module} reads back as {got}; the header says rank {rank}, "
                                  f"alpha {alpha:g}", hint=_HINT_RESAVE)
    if not any(bool(adapter.up.any()) for adapter in lora.modules.values() if isinstance(adapter, LoRAModule)):
        raise CheckpointError(f"{shown}: every up matrix is zero, so the LoRA changes nothing",
                              hint="training has not moved the adapters: check the learning rate and that the loss "
                                   "reaches them")


def _stored_pair(module: object, pair: object, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(down, up) as they will be stored: on the CPU, in `dtype`, copied (never a view of a live parameter)."""
    if not isinstance(module, str) or not module:
        raise ValueError(f"module names are non-empty strings, not {module!r}")
    if not isinstance(pair, tuple | list) or len(pair) != 2 or not all(isinstance(t, Tensor) for t in pair):
        raise ValueError(f"{module}: expected a (down, up) pair of tensors")
    down, up = pair
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != rank or up.shape[1] != rank:
        raise ValueError(f"{module}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a rank-{rank} pair "
                         f"(down is ({rank}, in), up is (out, {rank}))")
    stored = []
    for name, tensor in (("down", down), ("up", up)):
        if not tensor.is_floating_point():
            raise ValueError(f"{module}: its {name} matrix is {tensor.dtype}, not floating point")
        tensor = tensor.detach()
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{module}: its {name} matrix holds NaN or infinite values")
        kept = tensor.to(device="cpu", dtype=dtype, copy=True).contiguous()
        if not bool(torch.isfinite(kept).all()):
            raise ValueError(f"{module}: its {name} matrix overflows {_DTYPES[dtype]}; save it as float32")
        stored.append(kept)
    return stored[0], stored[1]


def _check_fit(stored: Mapping[str, tuple[Tensor, Tensor]], linears: Mapping[str, tuple[int, int]]) -> None:
    """Every module a linear of the denoiser, its down as wide as its input and its up as tall as its output."""
    for module, (down, up) in stored.items():
        if module not in linears:
            raise ValueError(f"{module!r} is not a linear of the denoiser")
        out, inp = linears[module]
        if down.shape[1] != inp or up.shape[0] != out:
            raise ValueError(f"{module}: down {tuple(down.shape)} and up {tuple(up.shape)} do not fit its linear "
                             f"(out {out}, in {inp})")


def _header(fmt: str, layout: LoRAFormat, modules: Mapping[str, object], rank: int, alpha: float,
            metadata: Mapping[str, str] | None, linears: Mapping[str, object] | None) -> dict[str, str]:
    header = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"header metadata is strings to strings, not {key!r}: {value!r}")
        if key in _RESERVED:
            raise ValueError(f"header key {key!r} is written by save_lora itself; name the setting otherwise")
        header[key] = value
    header.update({_FORMAT_KEY: fmt, _RANK_KEY: str(rank), _ALPHA_KEY: repr(float(alpha))})
    if layout.alpha is None:
        header[PEFT_METADATA_KEY] = _peft_header(modules, rank, alpha, linears)
    return header


def _peft_header(modules: Mapping[str, object], rank: int, alpha: float, linears: Mapping[str, object] | None
                 ) -> str:
    """The transformer's LoraConfig as diffusers' save_lora_weights stores it (lora_base.write_lora_layers): fields
    prefixed with the component, JSON with indent 2 and sorted keys. load_lora_weights builds LoraConfig(**fields)
    from it, so scale = lora_alpha / r; the fields that change that scale are spelled out rather than left to
    PEFT's defaults."""
    config = {
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "target_modules": _targets(modules, linears),
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }
    return json.dumps({f"{PEFT_COMPONENT}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)


def _targets(modules: Mapping[str, object], linears: Mapping[str, object] | None) -> list[str] | str:
    """PEFT's target_modules naming exactly the adapted modules: each module's tail (_target), except where the
    denoiser's linears show that tail also naming a linear the file does not adapt (FLUX's single-block "proj_out" is
    also its final proj_out; a block left out of training): those modules are named whole. Where even a whole name is
    another linear's tail (FLUX's final "proj_out"), a list cannot say it, and the targets become one regex, which
    PEFT matches against whole module names."""
    by_tail: dict[str, list[str]] = {}
    for module in modules:
        by_tail.setdefault(_target(module), []).append(module)
    tails: set[str] = set()
    wholes: set[str] = set()
    for tail, named in by_tail.items():
        if _names_more(tail, modules, linears):
            wholes.update(named)
        else:
            tails.add(tail)
    if not any(_names_more(whole, modules, linears) for whole in wholes):
        return sorted(tails | wholes)
    exact = [re.escape(whole) for whole in sorted(wholes)]
    tail = [r"(?:.*\.)?(?:" + "|".join(re.escape(t) for t in sorted(tails)) + ")"] if tails else []
    return "|".join(exact + tail)


def _names_more(target: str, modules: Mapping[str, object], linears: Mapping[str, object] | None) -> bool:
    """Whether a target_modules entry also names a linear the file does not adapt: PEFT matches it against a module
    name whole or as its dotted tail (peft.tuners.tuners_utils.check_target_module_exists)."""
    return linears is not None and any((name == target or name.endswith("." + target)) and name not in modules
                                       for name in linears)


def _target(module: str) -> str:
    """A module's name within its block, as PEFT's target_modules names it (matched as a dotted tail):
    "transformer_blocks.3.attn.to_q" -> "attn.to_q", "transformer_blocks.3.img_mlp.net.0.proj" ->
    "img_mlp.net.0.proj". Not the bare leaf ("to_q", "net.0.proj"): "net.0.proj" also names txt_mlp's linears, and
    PEFT warns on load (diffusers injects where the state dict has weights) whenever the header's targets name more
    modules than the file adapts. Exact for every block trained alike, which is how train-lora picks its targets."""
    return _BLOCK_PREFIX.sub("", module)


def _write_atomically(path: Path, tensors: dict[str, Tensor], header: dict[str, str]) -> None:
    """A temporary file beside `path` (same file system, so the rename is atomic), synced, then renamed over it."""
    folder = path.parent
    temp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"  # not *.safetensors: no loader lists it meanwhile
    try:
        # O_EXCL claims a fresh name; mode 0o666 lets the umask decide, as for any file the user writes
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise _output_error(path, e) from None
    try:
        safetensors.torch.save_file(tensors, str(temp), metadata=header)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as e:  # KeyboardInterrupt too: never leave a temporary file behind
        try:
            temp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _output_error(path, e) from e
        raise
    _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); where a folder cannot be opened (Windows) the rename stands as is."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _output_error(path: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot write the LoRA file {_show(path)} ({_show(e.strerror or e)})",
                       hint="check that the output folder exists, is writable and has free space")


def _show(value: object, limit: int = 160) -> str:
    """A path or key as one printable line, so that messages stay one line."""
    text = str(value)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
