"""One-file transformer checkpoints in place of a model folder's transformer weights: ComfyUI's repackaged and
FP8 files (keys under "model.diffusion_model."), files in the official key layout (DiffSynth's distilled
models, fine-tunes), and FLUX.1 in BFL's own layout (loading/flux_single_file.py). The configs, VAE, text encoder
and scheduler still come from the model folder.

The layout is found from the keys (LAYOUTS, a table), never from the file name, and loading is as strict as for
the folder: every tensor the network needs, nothing it does not know, the right shapes (checkpoint.load_module).
ComfyUI writes FP8 (e4m3fn) weights three ways, all read here into one form, "stored e4m3 values and a scale":
  * plain casts: e4m3 tensors and no scales (scale 1); often every tensor is cast, biases and norms too;
  * "scaled fp8" (older): a `scaled_fp8` marker tensor (its dtype names the FP8 kind), per-layer `.scale_weight`
    (one fp32 number per tensor) and sometimes `.scale_input`;
  * quantised ops (newer): per-layer `.weight_scale`, and `.comfy_quant` (JSON bytes naming the format) or the
    same JSON per layer under the header's `_quantization_metadata`; sometimes `.input_scale`.
Input scales are static activation scales for FP8 matmuls; qimg quantises activations per token at run time, so
they are read past. Formats qimg has no kernel for (e5m2, NVFP4, int8, bitsandbytes, GGUF) are refused by name.

Reading the header needs no torch, so qimg.with_transformer can check a file before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimg.errors import CheckpointError, InputError
from qimg.loading.flux_single_file import load_parts, split_bfl, take_rows
from qimg.loading.keymaps import LORA_FAMILY_MARKERS, LORA_FAMILY_NAMES, LORA_SUFFIXES

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from qimg.loading.hub import ModelRef

# (layout, key prefix), most specific first: the first whose prefix puts a family anchor among the keys wins.
LAYOUTS: tuple[tuple[str, str], ...] = (
    ("ComfyUI", "model.diffusion_model."),  # ComfyUI checkpoints and Comfy-Org's repackaged files
    ("ComfyUI", "diffusion_model."),  # the same, saved without the model wrapper
    ("diffusers", ""),  # the official names: diffusers, DiffSynth, most fine-tunes
)
# Keys only a transformer of the family has (any one of them identifies it; a missing one is then reported as
# missing by the strict load, not as "another model").
FAMILY_ANCHORS: dict[str, tuple[str, ...]] = {
    "qwen-image": ("img_in.weight", "txt_in.weight", "txt_norm.weight", "time_text_embed.timestep_embedder.linear_1"
                   ".weight"),
}
# A family's layouts in names other than the network's, tried before LAYOUTS under each of their prefixes:
# (layout, anchors). "BFL": FLUX.1's release and ComfyUI files, fused tensors split by loading/flux_single_file.py.
FAMILY_LAYOUTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "flux": (("BFL", ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                      "time_in.in_layer.weight", "final_layer.adaLN_modulation.1.weight")),),
}
# Key prefixes of the other components an all-in-one ComfyUI checkpoint carries (VAE, text encoders).
ALL_IN_ONE_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.", "vae.")
ADAPTER_TENSORS = ("lora_", "lokr_", "hada_", "dora_scale")  # last key parts of LoRA / LyCORIS / DoRA tensors
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # per-layer weight scale: value = stored * scale
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # static input scales, per-layer format
SCALED_FP8_MARKER = "scaled_fp8"
# ComfyUI's empty flag tensors, read past and kept for the family to check: Edit-2511's repackaged files carry
# __index_timestep_zero__ (its zero_cond_t, which qimg reads from the folder's config).
FLAGS = ("__index_timestep_zero__",)
FP8 = "F8_E4M3"  # safetensors' name for torch.float8_e4m3fn
FLOATS = ("F64", "F32", "F16", "BF16", FP8)
COMFY_FP8_FORMAT = "float8_e4m3fn"
BITSANDBYTES_TOKENS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # and quant_state.*
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_HINT_RELEASE = "use the bf16 or fp8_e4m3fn safetensors release of this transformer"


@dataclass(frozen=True, eq=False)
class TransformerFile:
    """A transformer checkpoint read from its header: layout, weights by module name, FP8 scales, markers."""

    path: Path
    family: str
    layout: str  # "diffusers", "ComfyUI" or a FAMILY_LAYOUTS one ("BFL")
    prefix: str  # the layout's key prefix
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # module name -> (safetensors dtype, shape), weights only
    stored: dict[str, str]  # module name -> its key in the file
    scales: dict[str, str]  # weight name ("...to_q.weight") -> key of its scale tensor
    skipped: tuple[str, ...]  # keys read past: markers, input scales, per-layer format records
    foreign: tuple[str, ...]  # keys outside the layout's prefix: unexpected, reported by the strict load
    flags: tuple[str, ...]  # ComfyUI marker tensors found (FLAGS)
    fp8_format: str  # "" (no FP8), "e4m3fn", "ComfyUI scaled fp8", "ComfyUI quantised ops"
    # The safetensors files (one, or a sharded release's shards) and each key's file; `path` is what was named.
    files: tuple[Path, ...] = ()
    where: dict[str, Path] = dataclasses.field(default_factory=dict)
    # A fused layout (BFL): module name -> the row ranges of its stored tensor it is (absent: the whole tensor).
    parts: dict[str, tuple[tuple[int, int], ...]] | None = None
    components: tuple[str, ...] = ()  # key prefixes of the other components an all-in-one file holds (read past)

    def rename(self) -> dict[str, str | None]:
        """Key in the file -> module name, or None for keys the loader reads past (scales, markers)."""
        out: dict[str, str | None] = {key: name for name, key in self.stored.items()}
        out.update({key: None for key in (*self.scales.values(), *self.skipped)})
        return out

    def fp8_linears(self) -> list[str]:
        """Module names of the linears whose weight is stored as e4m3."""
        return [n.removesuffix(".weight") for n, (dt, shape) in self.tensors.items()
                if dt == FP8 and len(shape) == 2 and n.endswith(".weight")]

    def kept_fp8(self) -> set[str]:
        """The FP8-stored linears, which load as FP8 storage as stored. Upcasting one would change no number (the
        file rounded it already) and only use more memory: ComfyUI's files store the modulation linears (6.8B
        parameters of Qwen-Image) in e4m3 too. Which of them run FP8 matmuls is the family's choice."""
        return set(self.fp8_linears())

    def upcast_fp8(self) -> int:
        """How many stored e4m3 tensors load in the compute dtype (norms, biases: everything but linear weights)."""
        kept = {f"{n}.weight" for n in self.kept_fp8()}
        return sum(1 for n, (dt, _) in self.tensors.items() if dt == FP8 and n not in kept)

    def summary(self) -> str:
        """One line: file, layout, tensor count, FP8 kind."""
        n_fp8 = len(self.fp8_linears())
        fp8 = f", {n_fp8} linears in FP8 ({self.fp8_format})" if n_fp8 else ""
        shards = f" in {len(self.files)} shards" if len(self.files) > 1 else ""
        return f"{self.path.name}: {self.layout} layout, {len(self.tensors)} tensors{shards}{fp8}"

    @property
    def what(self) -> str:
        """How load errors name the file."""
        return f"{_show(self.path.name)} ({self.layout} layout)"

    @functools.cached_property
    def _handles(self) -> dict[Path, Any]:
        return {}

    def _handle(self, key: str) -> Any:
        """The open file that holds `key`."""
        from safetensors import safe_open

        path = self.where.get(key, self.path)
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # truncated data, or the file changed since its header was read
                raise CheckpointError(f"{_show(path)} is not a readable safetensors file ({_show(e)})",
                                      hint="re-download it") from None
        return self._handles[path]

    def scale(self, weight: str) -> Tensor | None:
        """The fp32 scale of a stored FP8 weight (module name "...to_q.weight"): one number, or one per output row
        (shape (N,)); None when the file stores none (the values are the weights)."""
        key = self.scales.get(weight)
        if key is None:
            return None
        value = self._handle(key).get_tensor(key).float().reshape(-1)
        rows = (self.parts or {}).get(weight)  # a part of a fused tensor has its own rows of a per-row scale
        return value if rows is None or value.numel() == 1 else take_rows(value, rows)

    def dequantize(self, name: str, tensor: Tensor) -> Tensor:
        """A stored e4m3 tensor as the fp32 values it stands for (exact up to the one product with its scale)."""
        value = tensor.float()
        scale = self.scale(name)
        if scale is None:
            return value
        return value * (scale.reshape(-1, *([1] * (value.ndim - 1))) if scale.numel() > 1 else scale.reshape(()))

    def load(self, build: Callable[[], nn.Module], *, device: torch.device | str, dtype: torch.dtype,
             **grouping: Any) -> nn.Module:
        """The network `build` makes, filled from this file, strictly. The FP8-stored linears keep their e4m3
        weights (an nn.Linear holding them, for the caller to turn into an FP8 linear with `scale`); every other
        tensor is cast, FP8 ones dequantised, to `dtype`. grouping: load_module's group / on_group (block-by-block
        loading)."""
        from qimg.loading.checkpoint import load_module

        kept = {f"{n}.weight" for n in self.kept_fp8()}

        def convert(name: str, tensor: Tensor) -> Tensor:
            if name in kept:
                return tensor  # rounded once already, by whoever wrote the file: never requantised
            if self.tensors[name][0] == FP8:
                tensor = self.dequantize(name, tensor)
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        hint = (f"the file is not a {self.family} transformer of the variant and size transformer/config.json "
                "describes, or it is incomplete")
        if self.parts is not None:
            return load_parts(self, build, device=device, convert=convert, hint=hint, **grouping)
        return load_module(build, list(self.files or (self.path,)), device=device, dtype=dtype, rename=self.rename(),
                           convert=convert, what=self.what, hint=hint, **grouping)


def read_transformer_file(path: str | Path, family: str = "qwen-image") -> TransformerFile:
    """A transformer checkpoint's header, checked: a safetensors file, a known layout of `family`'s transformer,
    tensors qimg can read. Anything else is one line saying what the file looks like."""
    path = Path(path).expanduser()
    shown = _show(path)
    files = _weight_files(path, shown)
    header: dict[str, Any] = {}
    where: dict[str, Path] = {}
    metadata: dict[str, Any] = {}
    for file in files:
        part = _read_header(file, _show(file))
        meta = part.pop("__metadata__", None)
        metadata.update(meta if isinstance(meta, dict) else {})
        twice = next((k for k in part if k in header), None)
        if twice is not None:
            raise CheckpointError(f"{shown}: tensor {_show(twice)} is in both {where[twice].name} and {file.name}",
                                  hint="the shards are of two different releases; re-download them")
        header.update(part)
        where.update(dict.fromkeys(part, file))
    keys = list(header)
    if not keys:
        raise CheckpointError(f"{shown} holds no tensors", hint="re-download it")
    _refuse_other_kinds(shown, keys, family)
    layout, prefix = _layout(shown, keys, family)

    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    stored: dict[str, str] = {}
    scales: dict[str, str] = {}
    skipped: list[str] = []
    foreign: list[str] = []
    flags: list[str] = []
    marker = None
    others = {p for k in keys for p in ALL_IN_ONE_PREFIXES if prefix and k.startswith(p)}  # all-in-one files
    for key in keys:
        name = key[len(prefix):] if key.startswith(prefix) else None
        if key.startswith(tuple(others)):  # their VAE and text encoders: read past, the folder's are used
            skipped.append(key)
        elif name is None:
            foreign.append(key)
        elif name == SCALED_FP8_MARKER:
            marker = key
            skipped.append(key)
        elif name in FLAGS:
            flags.append(name)
            skipped.append(key)
        elif name.endswith(IGNORED_SUFFIXES):
            skipped.append(key)
        elif name.endswith(SCALE_SUFFIXES):
            layer = name.rsplit(".", 1)[0]
            scales[f"{layer}.weight"] = key
        else:
            tensors[name] = _entry(shown, key, header[key])
            stored[name] = key
    for weight, key in list(scales.items()):
        if weight not in tensors:  # a scale of nothing: reported as unexpected by the strict load
            foreign.append(key)
            del scales[weight]
    _check_formats(shown, header, tensors, scales, marker, prefix, metadata, where)
    parts = None
    if layout == "BFL":  # checked in BFL's names above; now onto the network's
        tensors, stored, scales, parts, unknown = split_bfl(shown, tensors, stored, scales)
        foreign.extend(unknown)
    fp8_format = ""
    if any(dt == FP8 for dt, _ in tensors.values()):
        quant_ops = any(k.endswith(".comfy_quant") for k in skipped) or "_quantization_metadata" in metadata
        fp8_format = ("ComfyUI scaled fp8" if marker is not None else "ComfyUI quantised ops" if quant_ops
                      else "e4m3fn" if not scales else "e4m3fn, scaled")
    return TransformerFile(path=path.resolve(), family=family, layout=layout, prefix=prefix, tensors=tensors,
                           stored=stored, scales=scales, skipped=tuple(skipped), foreign=tuple(foreign),
                           flags=tuple(flags), fp8_format=fp8_format, files=tuple(f.resolve() for f in files),
                           where={k: f.resolve() for k, f in where.items()}, parts=parts,
                           components=tuple(sorted(others)))


def with_transformer(model: str | Path | ModelRef, path: str | Path | None) -> ModelRef:
    """`model` (a ModelRef, or what qimg.resolve_model takes) with its transformer weights taken from one
    safetensors file (None: the folder's own). The file's header is checked here, before anything loads."""
    from qimg.loading.hub import ModelRef, resolve_model

    ref = model if isinstance(model, ModelRef) else resolve_model(model)
    if path is None:
        return dataclasses.replace(ref, transformer=None)
    found = read_transformer_file(path, ref.spec.family)
    return dataclasses.replace(ref, transformer=found.path)


def fp8_notes(found: TransformerFile, fp8: str | None, quantisable: Callable[[str], bool], dtype: str) -> list[str]:
    """What loading this file does with its FP8 tensors and an all-in-one file's other parts, as lines to print."""
    kept = found.kept_fp8()
    upcast = found.upcast_fp8()
    others = ", ".join(found.components)
    notes = [f"{found.path.name} is an all-in-one checkpoint: qimg reads only its transformer ({others} weights "
             "come from the model folder instead)"] if others else []
    if kept and fp8 != "compute":
        notes.append(f"{found.path.name} stores {len(kept)} linears in FP8 ({found.fp8_format}): they stay FP8 as "
                     f"stored (as with --fp8 weights, computing in {dtype}); upcasting them would only use more memory")
    elif kept:
        storage = sum(1 for name in kept if not quantisable(name))
        if storage:
            notes.append(f"{storage} of the {len(kept)} FP8 linears of {found.path.name} (modulation, embeddings, "
                         f"input and output layers) stay FP8 storage computing in {dtype}, as --fp8 keeps them")
    if upcast:
        notes.append(f"{upcast} FP8 tensors of {found.path.name} that are not linear weights (norms, biases) were "
                     f"upcast to {dtype}")
    return notes


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The first 16 hex digits of a file's sha256 (recorded in PNGs), computed once per file version. A sharded
    release (a folder or its index) hashes the list of its shards' names and hashes."""
    path = Path(path)
    if path.is_dir() or path.name.endswith(INDEX_SUFFIX):
        shards = _weight_files(path, _show(path))
        listing = "".join(f"{f.name} {file_sha256(f)}\n" for f in shards)
        return hashlib.sha256(listing.encode("utf-8")).hexdigest()[:16]
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()[:16]
    return _DIGESTS[key]


# -- header checks ------------------------------------------------------------------------------------------------


INDEX_SUFFIX = ".safetensors.index.json"


def _weight_files(path: Path, shown: str) -> list[Path]:
    """The safetensors files of a transformer named as one file, a sharded release's index, or a folder holding
    one index (or one file; DiffSynth's Qwen-Image-Distill-Full ships as diffusion_pytorch_model-0000N shards)."""
    from qimg.loading.checkpoint import safetensors_files

    try:
        is_dir = path.is_dir()
    except OSError:
        is_dir = False
    if path.name.endswith(INDEX_SUFFIX) and path.is_file():
        return safetensors_files(path.parent, path.name.removesuffix(INDEX_SUFFIX))
    if not is_dir:
        return [path]
    indexes = sorted(path.glob("*" + INDEX_SUFFIX))
    if len(indexes) == 1:
        return safetensors_files(path, indexes[0].name.removesuffix(INDEX_SUFFIX))
    files = sorted(path.glob("*.safetensors"))
    if not indexes and len(files) == 1:
        return files
    what = f"{len(indexes)} shard indexes" if indexes else f"{len(files)} .safetensors files and no index"
    raise InputError(f"{shown} is a folder with {what}", hint="pass the transformer's .safetensors file, or the "
                     "index of its shards (*.safetensors.index.json); a whole model folder goes to --model")


def _read_header(path: Path, shown: str) -> dict[str, Any]:
    """The safetensors JSON header, read with plain file I/O (an 8-byte little-endian length, then JSON)."""
    try:
        if not path.exists():
            raise InputError(f"{shown} does not exist", hint="check the transformer file's path")
        if path.is_dir():
            raise InputError(f"{shown} is a folder, not a transformer file",
                             hint="pass the .safetensors file; a model folder goes to --model")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            raw = f.read(n) if 2 <= n <= min(_MAX_HEADER, size - 8) else b""
    except (OSError, ValueError) as e:  # permissions, a name too long, an embedded NUL
        raise InputError(f"{shown} cannot be read ({_show(getattr(e, 'strerror', None) or e)})",
                         hint="check the transformer file's path and permissions") from None
    if head[:4] == b"GGUF":
        raise CheckpointError(f"{shown} is a GGUF file; qimg reads transformer files as safetensors only",
                              hint=_HINT_RELEASE)
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{shown} is not a safetensors file; qimg reads transformer files as safetensors "
                              "only", hint="qimg never unpickles .bin/.pt/.ckpt files; " + _HINT_RELEASE)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{shown} has a damaged safetensors header", hint="re-download it")
    return header


def _entry(shown: str, key: str, info: Any) -> tuple[str, tuple[int, ...]]:
    ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
    if not ok or not all(isinstance(d, int) and d >= 0 for d in info["shape"]):
        raise CheckpointError(f"{shown} has a damaged safetensors header (entry {_show(key)})",
                              hint="re-download it")
    return info["dtype"], tuple(info["shape"])


def _refuse_other_kinds(shown: str, keys: list[str], family: str) -> None:
    """A LoRA or another family's transformer, named as what it is."""
    suffixes = tuple(row[0] for row in LORA_SUFFIXES if row[0] != ".alpha")
    lora = next((k for k in keys if k.startswith(("lora_unet_", "lora_te")) or k.endswith(suffixes)
                 or k.rsplit(".", 1)[-1].startswith(ADAPTER_TENSORS)), None)
    if lora is not None:
        raise InputError(f"{shown} is a LoRA (key {_show(lora)}), not a transformer",
                         hint="load it with --lora (qimg.Pipeline.load_lora)")
    for other, tokens in LORA_FAMILY_MARKERS.items():
        hit = next((k for k in keys if other != family and set(k.split(".")) & set(tokens)), None)
        if hit is not None:
            name = LORA_FAMILY_NAMES.get(other, other)
            raise InputError(f"{shown} is a {name} transformer (key {_show(hit)}); this model is "
                             f"{LORA_FAMILY_NAMES.get(family, family)}",
                             hint=f"pass a {LORA_FAMILY_NAMES.get(family, family)} transformer file, or use a "
                                  f"{name} model")


def _layout(shown: str, keys: list[str], family: str) -> tuple[str, str]:
    anchors = FAMILY_ANCHORS.get(family, ())
    present = set(keys)
    for (layout, own), (_, prefix) in itertools.product(FAMILY_LAYOUTS.get(family, ()), LAYOUTS):
        if any(prefix + a in present for a in own):
            return layout, prefix
    for layout, prefix in LAYOUTS:
        if any(prefix + a in present for a in anchors) or (not anchors and any(k.startswith(prefix) for k in keys)):
            return layout, prefix
    name = LORA_FAMILY_NAMES.get(family, family)
    looks = "a VAE" if any(k.startswith(("encoder.", "decoder.")) for k in keys) else (
        "a text encoder" if any(".layers." in f".{k}" or k.startswith("visual.") for k in keys) else
        f"no {name} transformer")
    raise InputError(f"{shown} looks like {looks}: it has none of {', '.join(anchors[:3])} under any known "
                     f"prefix (its keys begin {_show(', '.join(sorted(keys)[:2]), 100)})",
                     hint=f"pass a {name} transformer .safetensors in the diffusers or ComfyUI layout")


def _check_formats(shown: str, header: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...]]],
                   scales: dict[str, str], marker: str | None, prefix: str, metadata: dict[str, Any],
                   where: dict[str, Path]) -> None:
    """Refuse, by name, every stored format qimg has no kernel for; check each FP8 scale's shape."""
    bnb = next((n for n in tensors if any(p in BITSANDBYTES_TOKENS or p.startswith("quant_state")
                                          for p in n.split("."))), None)
    if bnb is not None:
        raise CheckpointError(f"{shown} is bitsandbytes-quantised (NF4/FP4/int8; key {_show(bnb)}); qimg does not "
                              "read it", hint=_HINT_RELEASE)
    kind = None if marker is None else _entry(shown, marker, header[marker])[0]
    if kind is not None and kind not in (FP8, "F32"):  # ComfyUI: the marker's dtype is the FP8 kind (F32: e4m3fn)
        raise CheckpointError(f"{shown} is scaled FP8 of kind {_show(kind, 20)}; qimg reads FP8 e4m3fn only",
                              hint=_HINT_RELEASE)
    formats = _comfy_formats(shown, header, prefix, metadata, where)
    other = next(((layer, f) for layer, f in formats.items() if f != COMFY_FP8_FORMAT), None)
    if other is not None:
        raise CheckpointError(f"{shown} stores layers as ComfyUI {_show(other[1], 40)} (e.g. {_show(other[0])}); "
                              "qimg reads FP8 e4m3fn only", hint=_HINT_RELEASE)
    odd = sorted((dt, n) for n, (dt, _) in tensors.items() if dt not in FLOATS)
    if odd:
        dt, n = odd[0]
        kind = ("FP8 e5m2" if dt == "F8_E5M2" else "integer (quantised)" if dt[0] in "IU" else dt)
        raise CheckpointError(f"{shown} stores {sum(1 for d, _ in odd if d == dt)} tensors as {kind} "
                              f"(e.g. {_show(n)}); qimg reads bf16/fp16/fp32 and FP8 e4m3fn", hint=_HINT_RELEASE)
    for weight, key in scales.items():
        dt, shape = tensors[weight]
        numel = 1
        for d in _entry(shown, key, header[key])[1]:
            numel *= d
        if dt != FP8 or len(shape) != 2:
            raise CheckpointError(f"{shown} has a scale {_show(key)} for a weight that is not an FP8 matrix",
                                  hint="the file is damaged or in a format qimg does not read; " + _HINT_RELEASE)
        if numel not in (1, shape[0]) or header[key].get("dtype") not in FLOATS[:4]:
            raise CheckpointError(f"{shown}: FP8 scale {_show(key)} is not one number or one per output row "
                                  "(block-wise scales are not read)", hint=_HINT_RELEASE)


def _comfy_formats(shown: str, header: dict[str, Any], prefix: str, metadata: dict[str, Any],
                   where: dict[str, Path]) -> dict[str, str]:
    """Layer -> ComfyUI quantisation format, from the per-layer `.comfy_quant` JSON tensors or the header's
    `_quantization_metadata`."""
    formats: dict[str, str] = {}
    if "_quantization_metadata" in metadata:
        try:
            layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
            formats.update({k: str(v.get("format") if isinstance(v, dict) else v) for k, v in layers.items()})
        except (ValueError, AttributeError, TypeError):
            raise CheckpointError(f"{shown} has an unreadable _quantization_metadata header",
                                  hint="re-download it") from None
    records: dict[Path, list[str]] = {}
    for key in header:
        if key.endswith(".comfy_quant"):
            records.setdefault(where[key], []).append(key)
    for path, keys in records.items():
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")  # tensor offsets count from the header's end
            for key in keys:
                try:
                    begin, end = header[key]["data_offsets"]
                    f.seek(start + int(begin))
                    conf = json.loads(f.read(min(max(int(end) - int(begin), 0), 4096)).decode("utf-8"))
                    formats[key.removesuffix(".comfy_quant")] = str(conf.get("format"))
                except (ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError, OSError):
                    raise CheckpointError(f"{shown}: {_show(key)} is not a JSON quantisation record",
                                          hint="re-download it") from None
    return formats


def _show(value: object, limit: int = 160) -> str:
    """A path, key or reason as one printable line: messages stay one line whatever a file holds."""
    text = str(value)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
