"""LoRA files as trainers write them, read into two forms: denoiser module name -> a low-rank pair (down, up, alpha),
or a Kronecker pair (LyCORIS LoKr: w1, w2, scale).

The dialects (diffusers/PEFT, kohya/musubi, ComfyUI/ai-toolkit, DiffSynth, Lightning, LyCORIS; for FLUX also BFL
names, fal and XLabs) differ only in key prefixes, key suffixes and where alpha lives; those are the tables in
keymaps.py (LORA_DIALECTS, LORA_SUFFIXES, LORA_OWN_SUFFIXES, LORA_KINDS). A LyCORIS LoHa is exactly a low-rank pair
and is read as one (loading/adapters.py). Reading is loud: a shape that does not fit, a file made for another family,
an adapter kind qimg cannot apply exactly (DoRA, Tucker), a FLUX Control LoRA, or a file naming no module of the
model is an error. Keys that name nothing are returned for the caller to report. Safetensors only: nothing is ever
unpickled.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from qimg.errors import CheckpointError, InputError
from qimg.loading.adapters import MISFIT, Adapter, LoHaModule, LoKrModule, LoRAModule, loha_pair, lokr_rank, lokr_w
from qimg.loading.checkpoint import own_memory
from qimg.loading.keymaps import (
    LORA_DIALECTS,
    LORA_FAMILY_ARCHITECTURES,
    LORA_FAMILY_MARKERS,
    LORA_FAMILY_NAMES,
    LORA_KINDS,
    LORA_ONLY_FAMILY_MARKERS,
    LORA_OWN_SUFFIXES,
    LORA_SUFFIXES,
    LORA_TEXT_ENCODER_PREFIXES,
    LORA_UNSUPPORTED,
)
from qimg.loading.lora_flux import control_lora_key, xlabs_modules
from qimg.loading.lora_fused import bfl_modules, split_fused

# diffusers writes a LoRA's peft.LoraConfig as JSON under this header key (lora_base.LORA_ADAPTER_METADATA_KEY). A
# pipeline's save_lora_weights prefixes each field with the component ("transformer.lora_alpha"); a model's own
# save_lora_adapter writes the fields bare ("lora_alpha").
PEFT_METADATA_KEY = "lora_adapter_metadata"
PEFT_COMPONENT = "transformer"
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's default lora_alpha: what diffusers applies to a config without one
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MATRIX_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_ALPHA_DTYPES = _MATRIX_DTYPES + ("I8", "I16", "I32", "I64", "U8")
_HINT_DAMAGED = "re-download the LoRA, or save it again"
_HINT_OTHER_MODEL = "the LoRA was made for another model (or another size of this one)"


@dataclass(frozen=True)
class LoRAFile:
    """A LoRA file read against one denoiser: its adapters by module name, and the keys that named nothing."""

    path: Path
    dialect: str  # "diffusers", "kohya", "comfy", "diffsynth", "lightning", "lycoris"; FLUX also "fal", "bfl", "xlabs"
    family: str  # the family its keys name
    modules: dict[str, Adapter]  # denoiser module name ("transformer_blocks.3.attn.to_q") -> adapter
    unmatched: tuple[str, ...]  # tensor keys that named no module of the model, or were not understood
    metadata: dict[str, str]  # the safetensors header metadata

    def describe(self) -> dict[str, Any]:
        """Everything `qimg lora inspect` shows: file, dialect, family, adapter kinds, ranks and alphas as the file
        states them, targets by layer, size, the keys that matched nothing, the header metadata."""
        targets: dict[str, int] = {}
        for name in self.modules:
            target = re.sub(r"^[a-z_]+\.\d+\.", "", name)  # "transformer_blocks.3.attn.to_q" -> "attn.to_q"
            targets[target] = targets.get(target, 0) + 1
        return {
            "path": str(self.path),
            "size_bytes": self.path.stat().st_size,
            "dialect": self.dialect,
            "family": self.family,
            "modules": len(self.modules),
            "kinds": self._kinds(),
            "parameters": sum(m.parameters for m in self.modules.values()),
            "ranks": sorted({m.file_rank for m in self.modules.values() if m.file_rank is not None}),
            "alphas": sorted({m.file_alpha for m in self.modules.values() if m.file_alpha is not None}),
            "targets": dict(sorted(targets.items())),
            "unmatched": list(self.unmatched),
            "metadata": dict(self.metadata),
        }

    def summary(self) -> str:
        """One line: dialect, modules matched (by kind, where any is not a plain LoRA), rank(s), alpha(s), unmatched
        count. A LoKr with both factors whole has no rank: "full"."""
        kinds = self._kinds()
        by_kind = "" if set(kinds) <= {"LoRA"} else " (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")"
        stated = [(m.file_rank, m.file_alpha) for m in self.modules.values()]
        ranks = _values({r for r, _ in stated if r is not None})
        if any(r is None for r, _ in stated):
            ranks = "full" if ranks == "-" else ranks + "/full"
        alphas = _values({a for _, a in stated if a is not None})
        return (f"{self.dialect} LoRA: {len(self.modules)} modules{by_kind}, rank {ranks}, alpha {alphas}, "
                f"{len(self.unmatched)} unmatched keys")

    def _kinds(self) -> dict[str, int]:
        """Adapters by kind, in LORA_KINDS order."""
        found = Counter(m.kind for m in self.modules.values())
        return {kind: found[kind] for kind in LORA_KINDS if found[kind]}


@dataclass(frozen=True)
class _Dialect:
    """One row of keymaps.LORA_DIALECTS."""

    name: str
    prefix: str
    spelling: str  # "dotted" | "underscored" | "bfl" | "bfl_underscored" (FLUX_BFL_MODULES) | "xlabs"
    styles: tuple[str, ...]
    families: tuple[str, ...]

    def writes(self, style: str) -> bool:
        return style == "*" or "*" in self.styles or style in self.styles

    def serves(self, family: str) -> bool:
        return "*" in self.families or family in self.families


_DIALECTS = tuple(_Dialect(*row) for row in LORA_DIALECTS)
# The suffixes each row reads: all of LORA_SUFFIXES its styles take, and LORA_OWN_SUFFIXES only where it names them.
_SUFFIXES = {d: LORA_SUFFIXES + tuple(row for row in LORA_OWN_SUFFIXES if row[2] in d.styles) for d in _DIALECTS}


def _tokens(tokens: tuple[str, ...]) -> re.Pattern[str]:
    """Whole tokens of a key where "." and "_" both separate (kohya spells module paths with "_")."""
    alternatives = "|".join(re.escape(t.replace(".", "_")) for t in tokens)
    return re.compile(rf"(?:^|_)(?:{alternatives})(?:_|$)")


_FAMILY_TOKENS = {family: _tokens(LORA_FAMILY_MARKERS.get(family, ()) + LORA_ONLY_FAMILY_MARKERS.get(family, ()))
                  for family in {**LORA_FAMILY_MARKERS, **LORA_ONLY_FAMILY_MARKERS}}
_UNSUPPORTED = tuple((kind, _tokens(tokens), hint) for kind, tokens, hint in LORA_UNSUPPORTED)


def read_lora(path: str | Path, linears: Mapping[str, tuple[int, int]], family: str = "qwen-image") -> LoRAFile:
    """Read a LoRA file against a denoiser. linears: the denoiser's nn.Linear module names -> (out_features,
    in_features)."""
    path = Path(path)
    shown = _show(path)
    handle = _open(path)
    keys = list(handle.keys())
    metadata = dict(handle.metadata() or {})
    _refuse_other_family(shown, keys, metadata, family)
    _refuse_unsupported(shown, keys)
    if family == "flux":
        _refuse_flux_control(shown, handle, keys, linears)
    config = _peft_config(shown, metadata)

    # Each key -> (dialect row, module, role); keys of one module group by the row's prefix, so that one file
    # naming a module twice (two prefixes) is caught instead of one silently winning. FLUX's BFL names are modules
    # too, as wide as the linears they fuse, and so are XLabs' processor names; their adapters are split onto those
    # linears once read.
    bfl = bfl_modules(linears) if family == "flux" else {}
    xlabs = xlabs_modules(linears) if family == "flux" else {}
    fused = {**bfl, **xlabs}
    spellings = {"dotted": {name: name for name in linears}, "underscored": _underscored(linears),
                 "bfl": {name: name for name in bfl}, "bfl_underscored": _underscored(bfl),
                 "xlabs": {name: name for name in xlabs}}
    widths = {**linears, **{name: (sum(linears[t][0] for t in targets), linears[targets[0]][1])
                            for name, targets in fused.items()}}
    groups: dict[tuple[str, str], dict[str, str]] = {}
    dialect_of: dict[tuple[str, str], str] = {}
    guesses: Counter[str] = Counter()
    unmatched: list[str] = []
    for key in keys:
        dialect, module, role = _locate(key, spellings, family)
        if dialect is None or module is None or role is None:
            unmatched.append(key)
            if dialect is not None:
                guesses[dialect.name] += 1
            continue
        group = groups.setdefault((dialect.prefix, module), {})
        if role in group:
            raise CheckpointError(f"{shown} holds two {role} tensors for {module} ({_show(group[role])} and "
                                  f"{_show(key)})", hint="the file mixes two LoRAs; save each on its own")
        group[role] = key
        if role != "alpha":
            dialect_of.setdefault((dialect.prefix, module), dialect.name)

    adapters: dict[str, tuple[str, dict[str, str]]] = {}  # module -> (kind, its keys by role)
    found: Counter[str] = Counter()
    for where, group in groups.items():
        module = where[1]
        kind = _kind(shown, module, group)
        if kind is None:  # half an adapter, or an alpha alone: nothing to apply
            unmatched.extend(group.values())
            guesses[dialect_of.get(where, "unknown")] += 1
            continue
        if module in adapters:
            raise CheckpointError(f"{shown} holds two LoRAs for {module} ({_show(_first(adapters[module][1]))} and "
                                  f"{_show(_first(group))})", hint="the file mixes two LoRAs; save each on its own")
        adapters[module] = (kind, group)
        found[dialect_of[where]] += 1

    for module, (kind, group) in adapters.items():
        _check_fit(shown, handle, module, kind, group, widths[module])
    if not adapters:
        guess = (guesses.most_common(1)[0][0] if guesses else "unknown")
        if keys and all(k.startswith(LORA_TEXT_ENCODER_PREFIXES) for k in keys):
            hint = "it holds text-encoder adapters only; qimg applies LoRAs to the denoiser"
        elif keys:
            hint = f"is it a LoRA for another model? its first key is {_show(keys[0])}"
        else:
            hint = "the file holds no tensors"
        raise InputError(f"{shown}: no key of this LoRA matches the {family} transformer ({len(keys)} keys; "
                         f"dialect {guess})", hint=hint)

    modules: dict[str, Adapter] = {}
    named: dict[str, str] = {}  # linear -> the file's module that gave it its adapter (names it in messages)
    for module, (kind, group) in adapters.items():
        adapter = _BUILD[kind](shown, handle, module, group, config)
        parts = ({module: adapter} if module not in fused else
                 split_fused(shown, module, adapter, [(t, linears[t][0]) for t in fused[module]]))
        for target, part in parts.items():
            if target in modules:
                first = _first(adapters[named[target]][1])
                raise CheckpointError(f"{shown} holds two LoRAs for {target} ({_show(first)} and "
                                      f"{_show(_first(group))})",
                                      hint="the file mixes two LoRAs; save each on its own")
            modules[target], named[target] = part, module
    order = {key: i for i, key in enumerate(keys)}
    return LoRAFile(path=path, dialect=found.most_common(1)[0][0], family=family, modules=modules,
                    unmatched=tuple(sorted(unmatched, key=order.__getitem__)), metadata=metadata)


def _open(path: Path) -> Any:
    """The file's safetensors handle (memory-mapped), after making sure it is one: pickles are never opened."""
    shown = _show(path)
    try:
        if not path.exists():
            raise InputError(f"{shown} does not exist", hint="check the LoRA file's path")
        if path.is_dir():
            raise InputError(f"{shown} is a folder, not a LoRA file", hint="pass the .safetensors file inside it")
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise _not_safetensors(shown)
        with open(path, "rb") as f:
            head = f.read(9)
    except (OSError, ValueError) as e:  # permissions, a name too long, an embedded NUL
        raise InputError(f"{shown} cannot be read ({_one_line(getattr(e, 'strerror', None) or e)})",
                         hint="check the LoRA file's path and permissions") from None
    if len(head) < 9 or head[8:9] != b"{":  # safetensors: an 8-byte header length, then the JSON header
        raise _not_safetensors(shown)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for truncated or damaged headers
        raise CheckpointError(f"{shown} has a damaged safetensors header ({_one_line(e)})",
                              hint=_HINT_DAMAGED) from None


def _not_safetensors(shown: str) -> CheckpointError:
    return CheckpointError(f"{shown} is not a safetensors file; qimg reads LoRAs as safetensors only",
                           hint="qimg never unpickles .bin/.pt/.ckpt files; use the LoRA's .safetensors release")


def _refuse_other_family(shown: str, keys: list[str], metadata: dict[str, str], family: str) -> None:
    """A file whose keys (or model-spec header) name another family's modules is refused by name."""
    architecture = metadata.get("modelspec.architecture", "").strip().lower()
    for other, pattern in _FAMILY_TOKENS.items():
        if other == family:
            continue
        hit = next((k for k in keys if pattern.search(k.replace(".", "_"))), None)
        by_header = architecture.startswith(LORA_FAMILY_ARCHITECTURES.get(other, ()))
        if hit is not None or by_header:
            name = LORA_FAMILY_NAMES.get(other, other)
            why = f"its key {_show(hit)}" if hit is not None else f"modelspec.architecture {_show(architecture)}"
            raise InputError(f"{shown} is a {name} LoRA; this model is {family}",
                             hint=f"{why} names {name}; load a LoRA made for {family}")


def _refuse_unsupported(shown: str, keys: list[str]) -> None:
    for kind, pattern, hint in _UNSUPPORTED:
        hit = next((k for k in keys if pattern.search(k.replace(".", "_"))), None)
        if hit is not None:
            raise InputError(f"{shown} is a {kind} file (key {_show(hit)}); qimg does not read {kind} files yet",
                             hint=hint)


def _refuse_flux_control(shown: str, handle: Any, keys: list[str], linears: Mapping[str, tuple[int, int]]) -> None:
    """BFL's FLUX.1 Control LoRAs (Canny, Depth) by name: read as LoRAs they would fail on img_in's width."""
    found = control_lora_key(keys, lambda key: tuple(handle.get_slice(key).get_shape()), linears)
    if found is not None:
        raise InputError(f"{shown} is a FLUX Control LoRA (Canny/Depth: {_show(found[0])} {found[1]}); it needs a "
                         "control-image pipeline, which qimg does not have",
                         hint="FLUX.1 Control is not supported; use a LoRA made for FLUX.1-dev")


def _underscored(names: Iterable[str]) -> dict[str, str]:
    """kohya spelling -> module name; a spelling two modules share maps to neither (never guessed)."""
    seen: dict[str, str | None] = {}
    for name in names:
        spelled = name.replace(".", "_")
        seen[spelled] = name if seen.get(spelled, name) == name else None
    return {spelled: name for spelled, name in seen.items() if name is not None}


def _locate(key: str, spellings: Mapping[str, Mapping[str, str]],
            family: str) -> tuple[_Dialect | None, str | None, str | None]:
    """(dialect, module, role) of a key; module None (with the first dialect whose layout it fits) if it names no
    linear of the model."""
    fits = None
    for dialect in _DIALECTS:
        if not dialect.serves(family) or not key.startswith(dialect.prefix):
            continue
        rest = key[len(dialect.prefix):]
        for suffix, role, style in _SUFFIXES[dialect]:
            if not rest.endswith(suffix) or not dialect.writes(style):
                continue
            stem = rest[: len(rest) - len(suffix)]
            module = spellings[dialect.spelling].get(stem)
            if module is not None:
                return dialect, module, role
            fits = fits or dialect
    return fits, None, None


def _kind(shown: str, module: str, group: dict[str, str]) -> str | None:
    """The adapter kind (LORA_KINDS) a module's keys make whole, or None where they make none (half a pair, an alpha
    alone). Keys of two kinds on one module, or a LoKr factor stored both whole and as a pair, are refused."""
    roles = set(group) - {"alpha"}
    kinds = [kind for kind, factors in LORA_KINDS.items()
             if any(roles & set(given) for alternatives in factors for given in alternatives)]
    if len(kinds) > 1:
        raise CheckpointError(f"{shown} holds {' and '.join(kinds)} tensors for {module} ({_show(_first(group))} ...)",
                              hint="the file mixes two LoRAs; save each on its own")
    if not kinds:
        return None
    for alternatives in LORA_KINDS[kinds[0]]:
        given = [alt for alt in alternatives if roles & set(alt)]
        if len(given) > 1:
            keys = ", ".join(_show(group[r]) for alt in given for r in alt if r in group)
            raise CheckpointError(f"{shown}: the {kinds[0]} for {module} stores one factor twice ({keys})",
                                  hint=_HINT_DAMAGED)
        if not given or not set(given[0]) <= roles:
            return None
    return kinds[0]


def _first(group: dict[str, str]) -> str:
    """A module's first key that is not its alpha (names it in messages)."""
    return next((key for role, key in group.items() if role != "alpha"), next(iter(group.values())))


def _check_fit(shown: str, handle: Any, module: str, kind: str, group: dict[str, str],
               linear: tuple[int, int]) -> None:
    """Floating-point matrices whose shapes fit the linear (out, in), from the header alone."""
    views = {role: handle.get_slice(key) for role, key in group.items() if role != "alpha"}
    for role, view in views.items():
        if view.get_dtype() not in _MATRIX_DTYPES:
            raise CheckpointError(f"{shown}: {_show(group[role])} is stored as {view.get_dtype()}, not floating point",
                                  hint="qimg reads LoRAs stored as fp32, fp16, bf16 (or FP8)")
    shapes = {role: tuple(view.get_shape()) for role, view in views.items()}
    must = MISFIT[kind](shapes, linear)
    if must is not None:
        order = [r for factor in LORA_KINDS[kind] for alternative in factor for r in alternative if r in shapes]
        has = ", ".join(f"{r} {shapes[r]}" for r in order[:-1]) + f" and {order[-1]} {shapes[order[-1]]}"
        raise CheckpointError(f"{shown}: the {kind} for {module} has {has}; its linear is {linear}, so {must}",
                              hint=_HINT_OTHER_MODEL)


def _build_lora(shown: str, handle: Any, module: str, group: dict[str, str], config: dict[str, Any] | None
                ) -> LoRAModule:
    down, up = _tensor(shown, handle, group["down"]), _tensor(shown, handle, group["up"])
    rank = int(down.shape[0])
    if "alpha" in group:
        alpha = _stored_alpha(shown, handle, group["alpha"], rank)
    elif config is not None:
        alpha = _config_alpha(shown, config, module, rank)
    else:
        alpha = float(rank)  # no alpha anywhere: the PEFT convention, delta W = up @ down
    return LoRAModule(down=down, up=up, alpha=alpha)


def _build_loha(shown: str, handle: Any, module: str, group: dict[str, str], config: dict[str, Any] | None
                ) -> LoHaModule:
    w1a, w1b, w2a, w2b = (_tensor(shown, handle, group[r]) for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a",
                                                                       "hada_w2_b"))
    r1, r2 = int(w1b.shape[0]), int(w2b.shape[0])
    alpha = _lycoris_alpha(shown, handle, group, r1)
    down, up = loha_pair(w1a, w1b, w2a, w2b)
    return LoHaModule(down=down, up=up, alpha=alpha * r2, ranks=(r1, r2), loha_alpha=alpha)


def _build_lokr(shown: str, handle: Any, module: str, group: dict[str, str], config: dict[str, Any] | None
                ) -> LoKrModule:
    tensors = {role: _tensor(shown, handle, key) for role, key in group.items() if role != "alpha"}
    rank = lokr_rank({role: tuple(t.shape) for role, t in tensors.items()})
    alpha = None if rank is None else _lycoris_alpha(shown, handle, group, rank)
    return LoKrModule(w1=lokr_w(tensors, 1), w2=lokr_w(tensors, 2), scale=1.0 if rank is None else alpha / rank,
                      rank=rank, alpha=alpha, parameters=sum(t.numel() for t in tensors.values()))


_BUILD = {"LoRA": _build_lora, "LoHa": _build_loha, "LoKr": _build_lokr}


def _lycoris_alpha(shown: str, handle: Any, group: dict[str, str], rank: int) -> float:
    """A LyCORIS module's `.alpha`, or its rank where it has none (LyCORIS: no alpha means scale 1)."""
    return _stored_alpha(shown, handle, group["alpha"], rank) if "alpha" in group else float(rank)


def _tensor(shown: str, handle: Any, key: str) -> Tensor:
    try:
        return own_memory(handle.get_tensor(key))
    except Exception as e:  # a dtype this torch lacks, or data the header promised and the file does not hold
        raise CheckpointError(f"{shown}: tensor {_show(key)} cannot be read ({_one_line(e)})",
                              hint=_HINT_DAMAGED) from None


def _stored_alpha(shown: str, handle: Any, key: str, rank: int) -> float:
    """A kohya-style `.alpha`: one number. kohya reads an alpha of 0 as none at all (alpha = rank), and so does qimg."""
    view = handle.get_slice(key)
    dtype, shape = view.get_dtype(), tuple(view.get_shape())
    if dtype not in _ALPHA_DTYPES or math.prod(shape) != 1:
        raise CheckpointError(f"{shown}: {_show(key)} should hold one number (alpha), not a {dtype} tensor of shape "
                              f"{shape}", hint=_HINT_DAMAGED)
    value = float(_tensor(shown, handle, key).double().item())
    if not math.isfinite(value):
        raise CheckpointError(f"{shown}: {_show(key)} is {value}, not a finite alpha", hint=_HINT_DAMAGED)
    return value if value != 0 else float(rank)


def _peft_config(shown: str, metadata: dict[str, str]) -> dict[str, Any] | None:
    """The transformer's LoraConfig fields from diffusers' header metadata, or None where the file has none."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown}: its {PEFT_METADATA_KEY} header is not a JSON object", hint=_HINT_DAMAGED)
    prefix = PEFT_COMPONENT + "."
    config = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    if not config:  # a model's own save: bare LoraConfig fields (they never hold a "."), or other components only
        config = {k: v for k, v in data.items() if "." not in k}
    if not config:
        return None
    if config.get("use_dora") is True:
        raise InputError(f"{shown} is a DoRA file ({PEFT_METADATA_KEY} has use_dora); qimg does not read DoRA "
                         "files yet", hint="use a plain LoRA of the same adapter")
    return config


def _config_alpha(shown: str, config: dict[str, Any], module: str, rank: int) -> float:
    """lora_alpha, or the alpha_pattern entry matching the module the way PEFT matches (get_pattern_key)."""
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{shown}: alpha_pattern in its {PEFT_METADATA_KEY} header is not a JSON object",
                              hint=_HINT_DAMAGED)
    for pattern, value in patterns.items():
        try:  # PEFT: a pattern matches a whole module name or its dotted tail; "^..." only the whole name
            hit = re.match(rf"(.*\.)?({pattern})$", module) is not None
        except (re.error, RecursionError, OverflowError, ValueError):
            raise CheckpointError(f"{shown}: alpha_pattern {_show(pattern)} in its {PEFT_METADATA_KEY} header is "
                                  "not a regular expression", hint=_HINT_DAMAGED) from None
        if hit:
            alpha = value
            break
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise CheckpointError(f"{shown}: the alpha its {PEFT_METADATA_KEY} header gives {module} is "
                              f"{_show(repr(alpha))}, not a number", hint=_HINT_DAMAGED)
    if config.get("use_rslora") is True:  # rsLoRA (Kalajdzievski 2023): scale = alpha / sqrt(rank)
        return float(alpha) * math.sqrt(rank)
    return float(alpha)


def _values(values: set[int] | set[float]) -> str:
    """4, or 4/8/16, or 4..64 (6 values)."""
    text = [f"{v:g}" for v in sorted(values)]
    if not text:
        return "-"
    return "/".join(text) if len(text) <= 4 else f"{text[0]}..{text[-1]} ({len(text)} values)"


def _show(value: object, limit: int = 160) -> str:
    """A path, key or value as one printable line: messages stay one line whatever a file holds."""
    text = str(value)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(reason: object) -> str:
    return _show(reason, 200)
