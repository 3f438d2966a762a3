"""What a compiled block package (runtime/packaged.py) bakes in, and how one call becomes its inputs.

A package's key describes the block (its class, its submodules' classes and plain attributes, its tensors'
names, shapes and dtypes), the constant arguments, the kernels installed at the nets' call sites, the device,
torch's version and qimg's own sources. A call's arguments become tensors: a complex RoPE table as its real
view, ints and frozen dataclasses of ints (a TextPadding's prompt lengths) as the sizes of empty tensors, so they
stay shapes. What must not be baked in raises Unpackageable.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# nn.Module's own bookkeeping: not part of what a block computes
_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                               "_compiled_call_impl", "_is_full_backward_hook", "_state_dict_hooks",
                               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                               "_load_state_dict_post_hooks", "_backward_pre_hooks", "_backward_hooks",
                               "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                               "_forward_pre_hooks_with_kwargs"})
_HOOKS = ("_forward_hooks", "_forward_pre_hooks")


class Unpackageable(Exception):
    """The block, or one call's arguments, cannot be baked into a package (the reason is the message)."""


def callable_name(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        return f"partial({callable_name(fn.func)}, {describe(fn.args)}, {describe(fn.keywords)})"
    if isinstance(fn, types.MethodType):
        return callable_name(fn.__func__)
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module is None or name is None:
        raise Unpackageable(f"a callable without a stable name: {fn!r}")
    return f"{module}.{name}"


def describe(value: Any) -> Any:
    """A JSON-able description of a value a traced block would bake in as a constant."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if isinstance(value, tuple | list):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, Tensor):
        raise Unpackageable("a tensor attribute that is neither a parameter nor a buffer")
    if callable(value) and not isinstance(value, nn.Module):
        return callable_name(value)
    raise Unpackageable(f"an attribute of type {type(value).__name__}")


def structure(block: nn.Module) -> list[Any]:
    """What of a block a package bakes in besides its tensors' values (see the module docstring). Raises
    Unpackageable for what must not be baked in.

    A module class may name plain tensor attributes its forward reads as values (`packaged_inputs`: they become
    package inputs, as its parameters do), plain attributes its forward never reads (`packaged_ignores`: left
    out of the key) and attributes that change after loading (`packaged_state`: checked on every call); a list of
    submodules (which ones are active) is described by their names."""
    named = {id(m): n for n, m in block.named_modules()}
    parts: list[Any] = []
    for name, module in block.named_modules():
        if module is not block and any(getattr(module, h, None) for h in _HOOKS):
            raise Unpackageable(f"forward hooks on {name}")
        inputs, ignored = _inputs_of(module), set(getattr(type(module), "packaged_ignores", ()))
        attrs: dict[str, Any] = {}
        for k, v in vars(module).items():
            if k in _MODULE_INTERNALS or k in _HOOKS or k in ignored or (module is block and k == "forward"):
                continue  # the block's own forward: the package's stand-in
            if k in inputs and isinstance(v, Tensor):
                attrs[k] = ["input", list(v.shape), str(v.dtype), v.device.type]
            elif isinstance(v, list | tuple) and v and all(isinstance(m, nn.Module) for m in v):
                if any(id(m) not in named for m in v):
                    raise Unpackageable(f"{name}.{k} holds a module from outside the block")
                attrs[k] = ["modules", [named[id(m)] for m in v]]
            else:
                attrs[k] = describe(v)
        parts.append([name, f"{type(module).__module__}.{type(module).__qualname__}", attrs])
    parts.append([[n, list(t.shape), str(t.dtype)] for n, t in named_tensors(block)])
    return parts


def _inputs_of(module: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(type(module), "packaged_inputs", ()))


def named_tensors(block: nn.Module) -> list[tuple[str, Tensor]]:
    return [*block.named_parameters(), *block.named_buffers()]


def module_ids(block: nn.Module) -> tuple[int, ...]:
    """The ids of the block and its submodules: a new one for a new arrangement. A plain walk: nn.Module.modules
    builds prefixes and a memo set, 3x the time."""
    ids, stack = [], [block]
    while stack:
        module = stack.pop()
        ids.append(id(module))
        stack.extend(m for m in module._modules.values() if m is not None)
    return tuple(ids)


def tensor_slots(block: nn.Module) -> list[tuple[nn.Module, str, str, str]]:
    """Where each of named_tensors(block) lives: (module, "_parameters" or "_buffers", its name there, its full name),
    in the same order, then the plain tensor attributes that modules name as `packaged_inputs` ("__dict__"): what
    a call passes the package besides its arguments, fetched without walking the module tree."""
    where: dict[int, tuple[nn.Module, str, str, str]] = {}
    for prefix, module in block.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is not None:  # a tensor shared by two modules: named as named_parameters names it, first
                    where.setdefault(id(t), (module, kind, name, f"{prefix}.{name}" if prefix else name))
    attributes = [(module, "__dict__", k, f"{prefix}.{k}" if prefix else k) for prefix, module in block.named_modules()
                  for k in _inputs_of(module) if isinstance(vars(module).get(k), Tensor)]
    return [where[id(t)] for _, t in named_tensors(block)] + attributes


def kernel_ids() -> tuple[int, ...]:
    from qimg.nets import layers

    return (id(layers._attention_impl),)


def process_kernels() -> dict[str, str]:
    """The kernels installed process-wide that a package bakes in: the attention kernel. The fused kernels' call
    sites are traced in their PyTorch forms whatever the process uses (runtime/kernels.pytorch_forms)."""
    from qimg.nets import layers

    return {"attention": callable_name(layers._attention_impl), "other call sites": "pytorch forms"}


@functools.cache
def code_version() -> str:
    """torch's version and a digest of qimg's sources: a package traced from other code is another package."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# -- one call's arguments, flattened to tensors ----------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a call's arguments become the package's tensor inputs (after the weights) and back. Each entry:
    ("tensor", i) a tensor, ("complex", i) a complex tensor passed as its real view, ("int", i) an int passed as
    the size of an empty tensor, ("record", type, ((field, i or (i, ...)), ...)) a frozen dataclass of ints and
    tuples of ints (a TextPadding's lengths) likewise, ("const", value) anything else (baked in: part of the key).
    """

    entries: tuple[Any, ...]
    names: tuple[str, ...]


def _int_like(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record(value: Any) -> bool:
    """A frozen dataclass whose fields are all ints or tuples of ints."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return False
    if not value.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        return False
    return all(_int_like(v) or (isinstance(v, tuple) and all(map(_int_like, v)))
               for v in (getattr(value, f.name) for f in dataclasses.fields(value)))


def flatten(args: dict[str, Any], device: torch.device) -> tuple[Layout, list[Tensor]]:
    tensors: list[Tensor] = []
    entries: list[Any] = []

    def carrier(n: int) -> int:
        tensors.append(torch.empty((n, 0), device=device))
        return len(tensors) - 1

    for value in args.values():
        if isinstance(value, Tensor):
            if value.is_complex():
                tensors.append(torch.view_as_real(value))
                entries.append(("complex", len(tensors) - 1))
            else:
                tensors.append(value)
                entries.append(("tensor", len(tensors) - 1))
        elif _int_like(value):
            entries.append(("int", carrier(value)))
        elif _record(value):
            fields = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
            entries.append(("record", type(value), tuple(
                (name, carrier(v) if _int_like(v) else tuple(carrier(n) for n in v)) for name, v in fields)))
        else:
            describe(value)  # refuses what cannot be baked in
            entries.append(("const", value))
    return Layout(tuple(entries), tuple(args)), tensors


def unflatten(layout: Layout, tensors: list[Tensor]) -> list[Any]:
    out: list[Any] = []
    for kind, *ref in layout.entries:
        if kind == "tensor":
            out.append(tensors[ref[0]])
        elif kind == "complex":
            out.append(torch.view_as_complex(tensors[ref[0]]))
        elif kind == "int":
            out.append(tensors[ref[0]].shape[0])
        elif kind == "record":
            cls, fields = ref
            out.append(cls(**{name: tensors[i].shape[0] if isinstance(i, int)
                              else tuple(tensors[j].shape[0] for j in i) for name, i in fields}))
        else:
            out.append(ref[0])
    return out
