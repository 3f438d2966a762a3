"""LoRA adapters applied from outside, after loading, as an unmerged side branch (LoRA: Hu et al., 2021).

y = base(x) + sum_a strength_a * scale_a * branch_a(x), where branch_a(x) = delta W_a @ x without delta W_a:
- a low-rank pair (LoRA, and LyCORIS LoHa read as its exact pair): (x @ down^T) @ up^T, with scale = alpha / rank;
- a Kronecker pair (LyCORIS LoKr, delta W = kron(W1, W2), W1 (a, b), W2 (c, d)): x (..., b*d) seen as X (..., b, d)
  gives W1 @ X @ W2^T (..., a, c), which is kron(W1, W2) @ x laid out as (..., a*c). Its cost is that of two small
  matmuls, never of the (a*c, b*d) matrix (LyCORIS's bypass_forward_diff does the same).

The base linear is never touched, so this is exact on any base: a plain nn.Linear, or an FP8Linear, where merging a
bf16-trained delta into e4m3 weights would round it away (grids with Lightning on a naive FP8 base, Qwen-Image-
Lightning#32; ComfyUI's bypass mode does the same). Several named adapters stack on one wrapper; a strength can
change at any time; detaching the last adapter puts the very base module object back.

Composition with the other runtime features:
- FP8: wrap after apply_fp8; the branch runs in the activation dtype next to the FP8 matmul.
- Offload: adapter tensors are buffers of the blocks they live in. A block packed into host memory before its
  modules were wrapped (or unwrapped) must be packed again: call `Offloaded.repack(blocks_of(changed, block_of))`
  with the names attach_lora / detach_lora return (and `repack(rest=True)` when a changed module is outside the
  blocks). Changing a strength moves no tensor and needs no repack.
- Compile: the forward iterates a fixed Python list of adapters, so a wrapped block
  compiles with fullgraph=True. A strength is a tensor the graph reads, so changing it never recompiles; turning
  an adapter on or off (strength 0), attaching or detaching changes the list: one more graph each.
"""

from __future__ import annotations

import abc
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qimg.runtime.fp8 import FP8Linear

_ORDER = itertools.count()  # attach order across a model's wrappers (lora_names lists adapters in it)


def _linear_info(module: nn.Module) -> tuple[int, int, torch.dtype, torch.device] | None:
    """(in_features, out_features, compute dtype, device) of a linear-like module, or None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.weight.dtype, module.weight.device
    if isinstance(module, FP8Linear):
        return module.in_features, module.out_features, module.out_dtype, module.weight_fp8.device
    return None


def _check_factor(what: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"LoRA {what} must be a finite number, got {value}")
    return value


class Kronecker(NamedTuple):
    """A LoKr adapter for attach_lora: delta W = scale * kron(w1, w2); w1 (a, b) and w2 (c, d) fit a linear
    (out, in) = (a*c, b*d). A plain (down, up, scale) tuple is a low-rank pair."""

    w1: Tensor
    w2: Tensor
    scale: float


def _check_kronecker(where: str, in_features: int, out_features: int, w1: Tensor, w2: Tensor) -> None:
    if w1.ndim != 2 or w2.ndim != 2 or 0 in (*w1.shape, *w2.shape):
        raise ValueError(f"LoKr for {where}: w1 and w2 must be non-empty 2-D, got {tuple(w1.shape)} and "
                         f"{tuple(w2.shape)}")
    (a, b), (c, d) = w1.shape, w2.shape
    if (a * c, b * d) != (out_features, in_features):
        raise ValueError(
            f"LoKr for {where} does not fit a linear of {in_features} -> {out_features}: kron of w1 {(a, b)} and w2 "
            f"{(c, d)} is ({a * c}, {b * d}), needs ({out_features}, {in_features})"
        )


def _check_shapes(where: str, in_features: int, out_features: int, down: Tensor, up: Tensor) -> None:
    if down.ndim != 2 or up.ndim != 2:
        raise ValueError(f"LoRA for {where}: down and up must be 2-D, got {tuple(down.shape)} and {tuple(up.shape)}")
    rank = down.shape[0]
    if rank == 0 or down.shape[1] != in_features or tuple(up.shape) != (out_features, rank):
        raise ValueError(
            f"LoRA for {where} does not fit a linear of {in_features} -> {out_features}: down {tuple(down.shape)} "
            f"(needs (rank, {in_features})), up {tuple(up.shape)} (needs ({out_features}, rank))"
        )


class _Branch(nn.Module, abc.ABC):
    """One named adapter on one linear: its tensors as buffers, scale and strength; branch(x) = delta W @ x."""

    # For a compiled block package (runtime/packaged.py): the strength's factor is an input (a new strength is a
    # new value, not a new package), and the forward never reads the float strength or the attach order.
    packaged_inputs: ClassVar[tuple[str, ...]] = ("factor",)
    packaged_ignores: ClassVar[tuple[str, ...]] = ("_strength", "order")

    def __init__(self, name: str, scale: float, strength: float) -> None:
        super().__init__()
        self.name, self.scale = name, scale
        self.order = next(_ORDER)
        # strength * scale as a 0-d CPU tensor the forward multiplies by (a CPU scalar joins a GPU op as a kernel
        # argument). A compiled block then reads it as an input: a new strength is a new value, not a new graph (a
        # Python float here cost a ~6 s recompile of the full-size model on the first change: bench/lora.py). A
        # plain attribute, not a buffer: offloading never packs it, so a change needs no repack.
        self.factor = torch.tensor(scale * strength, dtype=torch.float32)
        self._strength = strength

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = value
        with torch.no_grad():
            self.factor.fill_(self.scale * value)

    def _keep(self, name: str, tensor: Tensor) -> None:
        # Inference stores the matrices as buffers (no grad, not in the base's state_dict: saving adapters is the
        # LoRA file writer's job). Training turns them into nn.Parameters (fp32 master copies: trainable_lora);
        # the forward reads them the same way.
        self.register_buffer(name, tensor.detach(), persistent=False)

    @abc.abstractmethod
    def branch(self, x: Tensor) -> Tensor:
        """delta W @ x (..., out) for x (..., in), without the scale or the strength."""

    @abc.abstractmethod
    def dense_delta(self) -> Tensor:
        """delta W (out, in) in fp32, with the scale and without the strength: what a merge adds to the weight."""


class _Adapter(_Branch):
    """A low-rank pair: down (r, in) and up (out, r)."""

    def __init__(self, name: str, down: Tensor, up: Tensor, scale: float, strength: float) -> None:
        super().__init__(name, scale, strength)
        self._keep("down", down)  # (r, in)
        self._keep("up", up)  # (out, r)

    def branch(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))

    def dense_delta(self) -> Tensor:
        return (self.up.float() @ self.down.float()) * self.scale

    def extra_repr(self) -> str:
        return f"{self.name!r}, rank={self.down.shape[0]}, scale={self.scale:g}, strength={self.strength:g}"


class _KroneckerAdapter(_Branch):
    """A Kronecker pair: w1 (a, b) and w2 (c, d), delta W = kron(w1, w2) of shape (a*c, b*d)."""

    def __init__(self, name: str, w1: Tensor, w2: Tensor, scale: float, strength: float) -> None:
        super().__init__(name, scale, strength)
        self._keep("w1", w1)  # (a, b)
        self._keep("w2", w2)  # (c, d)
        self.split = (int(w1.shape[1]), int(w2.shape[1]))  # (b, d), Python ints: the compiled graph reshapes by them

    def branch(self, x: Tensor) -> Tensor:
        xs = x.unflatten(-1, self.split)  # (..., b, d)
        y = torch.matmul(self.w1.to(x.dtype), F.linear(xs, self.w2.to(x.dtype)))  # W1 @ X @ W2^T: (..., a, c)
        return y.flatten(-2)  # (..., a*c)

    def dense_delta(self) -> Tensor:
        return torch.kron(self.w1.float(), self.w2.float()) * self.scale

    def extra_repr(self) -> str:
        return (f"{self.name!r}, kron {tuple(self.w1.shape)} x {tuple(self.w2.shape)}, scale={self.scale:g}, "
                f"strength={self.strength:g}")


class LoRALinear(nn.Module):
    """Wraps a linear-like module (nn.Linear or FP8Linear): y = base(x) + sum_a strength_a * scale_a * branch_a(x)."""

    # For a compiled block package (runtime/packaged.py): which adapters run changes with their strengths (0: off)
    packaged_state: ClassVar[tuple[str, ...]] = ("_active",)

    base: nn.Module

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        info = _linear_info(base)
        if info is None:
            raise ValueError(f"LoRA needs a linear layer (nn.Linear or FP8Linear), got {type(base).__name__}")
        self.in_features, self.out_features = info[0], info[1]
        self.base = base
        self.adapters = nn.ModuleList()
        self._active: list[_Branch] = []  # adapters with a non-zero strength, in attach order

    def add(self, name: str, down: Tensor, up: Tensor, scale: float, strength: float) -> None:
        """Add adapter `name` (scale = alpha / rank). down (r, in) and up (out, r) become this module's buffers as
        given (detached, not copied or converted: attach_lora passes fresh copies in the right dtype and device)."""
        self._append(name, _check_shapes, _Adapter, down, up, scale, strength)

    def add_kronecker(self, name: str, w1: Tensor, w2: Tensor, scale: float, strength: float) -> None:
        """Add LoKr adapter `name`: delta W = scale * kron(w1, w2), w1 (a, b) and w2 (c, d) with a*c = out and
        b*d = in. The tensors become buffers as given, like add's."""
        self._append(name, _check_kronecker, _KroneckerAdapter, w1, w2, scale, strength)

    def _append(self, name: str, check: Callable[..., None], kind: Callable[..., _Branch], t1: Tensor, t2: Tensor,
                scale: float, strength: float) -> None:
        if name in self.names:
            raise ValueError(f"LoRA {name!r} is already attached to this layer")
        check(f"adapter {name!r}", self.in_features, self.out_features, t1, t2)
        scale, strength = _check_factor("scale", scale), _check_factor("strength", strength)
        self.adapters.append(kind(name, t1, t2, scale, strength))
        self._refresh()

    def set_strength(self, name: str, strength: float) -> None:
        self._get(name).strength = _check_factor("strength", strength)
        self._refresh()

    def remove(self, name: str) -> None:
        self._get(name)  # a clear error for a name that is not here
        del self.adapters[self.names.index(name)]
        self._refresh()

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def _get(self, name: str) -> _Branch:
        for a in self.adapters:
            if a.name == name:
                return a
        raise ValueError(f"no LoRA {name!r} on this layer (attached: {', '.join(self.names) or 'none'})")

    def _refresh(self) -> None:
        # Strength 0 skips the branch: it then gives the base output bit for bit, even if an adapter holds inf/NaN.
        self._active = [a for a in self.adapters if a.strength != 0.0]

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        # The branch runs in the activation dtype, like diffusers/PEFT; .to() is a no-op when the dtypes agree.
        for a in self._active:
            out = out + a.branch(x) * a.factor  # a 0-d fp32 tensor: the product stays in x's dtype
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _resolve(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"LoRA target {name!r}: the model has no module of that name") from None
    if name.endswith(".base") and isinstance(_parent(model, name)[0], LoRALinear):
        raise ValueError(f"LoRA target {name!r}: name the wrapped module ({name[: -len('.base')]!r}), not its base")
    return module


# (shape check, the LoRALinear method that adds it) for each adapter form attach_lora takes
_LOW_RANK = (_check_shapes, LoRALinear.add)
_KRONECKER = (_check_kronecker, LoRALinear.add_kronecker)


def attach_lora(
    model: nn.Module,
    name: str,
    modules: Mapping[str, tuple[Tensor, Tensor, float] | Kronecker],
    strength: float = 1.0,
    *,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """For each module name -> (down, up, scale) or Kronecker(w1, w2, scale): wrap model's module of that name in a
    LoRALinear (or reuse the wrapper already there) and add adapter `name`. Adapter tensors are stored as buffers (no
    grad) in `dtype` (default: the dtype the base computes in; for FP8Linear its out_dtype) on the base's device.
    Returns the module names changed. Refuses (ValueError with a clear message) a name already attached, a module that
    is not linear-like, or shapes that do not fit (down (r, in), up (out, r); kron(w1, w2) (out, in)).

    Everything is checked before anything changes, so a refused call leaves the model as it was. A block already
    packed into host memory needs `Offloaded.repack` afterwards (see blocks_of).
    """
    if name in lora_names(model):
        raise ValueError(f"a LoRA named {name!r} is already attached; detach it first or choose another name")
    if not modules:
        raise ValueError(f"LoRA {name!r} has no modules to attach to")
    strength = _check_factor("strength", strength)
    plan = []
    for target, value in modules.items():
        check, add = _KRONECKER if isinstance(value, Kronecker) else _LOW_RANK  # a plain tuple is a low-rank pair
        t1, t2, scale = value
        module = _resolve(model, target)
        base = module.base if isinstance(module, LoRALinear) else module
        info = _linear_info(base)
        if info is None:
            raise ValueError(
                f"LoRA {name!r} targets {target!r}, a {type(base).__name__}: only linear layers (nn.Linear, "
                f"FP8Linear) take a LoRA"
            )
        in_features, out_features, base_dtype, device = info
        check(f"{target!r} (LoRA {name!r})", in_features, out_features, t1, t2)
        plan.append((target, module, add, t1, t2, _check_factor("scale", scale), dtype or base_dtype, device))
    for target, module, add, t1, t2, scale, store_dtype, device in plan:
        if not isinstance(module, LoRALinear):
            parent, child = _parent(model, target)
            wrapper = LoRALinear(module)
            setattr(parent, child, wrapper)
            module = wrapper
        # Fresh copies: the wrapper owns them (offload rebinds their storage; the caller's tensors stay untouched).
        add(module, name, t1.detach().to(device=device, dtype=store_dtype, copy=True),
            t2.detach().to(device=device, dtype=store_dtype, copy=True), scale, strength)
    return [target for target, *_ in plan]


def trainable_lora(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Turn adapter `name`'s matrices into trainable fp32 parameters (the master copies a trainer keeps; the
    forward casts them to the activation dtype, so gradients reach them in fp32). Returns them by
    "<module>.<down|up>" (or w1/w2), in the model's module order, for the optimizer and the LoRA writer."""
    params: dict[str, nn.Parameter] = {}
    for target, wrapper in _wrappers(model):
        for adapter in wrapper.adapters:
            if adapter.name != name:
                continue
            for key, tensor in list(adapter._buffers.items()):
                if tensor is None:
                    continue
                del adapter._buffers[key]
                param = nn.Parameter(tensor.detach().float(), requires_grad=True)
                adapter.register_parameter(key, param)
                params[f"{target}.{key}"] = param
    if not params:
        raise ValueError(f"no LoRA named {name!r} is attached (attached: {', '.join(lora_names(model)) or 'none'})")
    return params


def _wrappers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_lora_strength(model: nn.Module, name: str, strength: float) -> int:
    """Set adapter `name`'s strength on every layer it is on; returns how many. ValueError if it is on none."""
    strength = _check_factor("strength", strength)
    touched = [m for _, m in _wrappers(model) if name in m.names]
    if not touched:
        raise ValueError(f"no LoRA named {name!r} is attached (attached: {', '.join(lora_names(model)) or 'none'})")
    for m in touched:
        m.set_strength(name, strength)
    return len(touched)


def detach_lora(model: nn.Module, name: str) -> list[str]:
    """Remove adapter `name`; a wrapper left with no adapter is replaced by its base module again (the same object).
    Returns the module names changed; ValueError if the adapter is on none. Offloaded blocks among them want a
    repack afterwards (it drops the removed tensors from the host copies)."""
    touched = [(n, m) for n, m in _wrappers(model) if name in m.names]
    if not touched:
        raise ValueError(f"no LoRA named {name!r} is attached (attached: {', '.join(lora_names(model)) or 'none'})")
    for target, m in touched:
        m.remove(name)
        if not m.adapters:
            parent, child = _parent(model, target)
            setattr(parent, child, m.base)
    return [n for n, _ in touched]


def lora_names(model: nn.Module) -> list[str]:
    """The adapters attached to `model`, in the order they were attached."""
    first: dict[str, int] = {}
    for _, m in _wrappers(model):
        for a in m.adapters:
            first[a.name] = min(first.get(a.name, a.order), a.order)
    return sorted(first, key=first.__getitem__)


def blocks_of(names: Iterable[str], block_of: Callable[[str], int | None]) -> list[int]:
    """The blocks (sorted, each once) that hold the named modules, for `Offloaded.repack`; block_of maps a module
    name to its run-order block index, or None outside the blocks (those need `repack(rest=True)`)."""
    return sorted({i for i in map(block_of, names) if i is not None})
