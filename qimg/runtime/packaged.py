"""Compiled blocks that a later process loads in milliseconds: AOTInductor packages under $QIMG_HOME/compile.

Regional torch.compile (runtime/compile.py) leaves a warm kernel cache behind, but every new process still
imports the compiler and traces the block again: ~4.5 s on an H200 host (bench/results/first_image_*_h200.json),
as much as a Lightning image's whole denoise. Here the repeated block is exported (torch.export) with its
weights as inputs, compiled ahead of time (AOTInductor) and saved; one package serves every block of its class,
and a later process loads it with torch's C++ loader without importing torch._dynamo or torch._inductor
(bench/results/compile_reuse_cpu.json).

What a package bakes in is what its key names (runtime/package_key.py). It is traced through the PyTorch forms
of the fused kernels' call sites (runtime/kernels.pytorch_forms), which inductor fuses itself: a package that
called a qimg op would call it back through Python (and AOTInductor refuses the ops' dtype arguments).

A key's first package has static shapes (the faster kernels; a cron job's shapes never change); a call whose
shapes fit none of the key's packages builds one more, with every size symbolic where the trace allows, which
then serves the other prompt lengths and image sizes.

A block that cannot be packaged (a tensor attribute the graph would bake in and no `packaged_inputs` declares;
gradients needed), or whose export or compile fails, runs through torch.compile as before, with one warning
for a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qimg.runtime.compile import compile_blocks, prepare_compiler
from qimg.runtime.kernels import pytorch_forms
from qimg.runtime.package_key import (
    Layout,
    Unpackageable,
    callable_name,
    code_version,
    describe,
    flatten,
    kernel_ids,
    module_ids,
    process_kernels,
    structure,
    tensor_slots,
    unflatten,
)

_FAILURE = "failed.txt"  # in a key's folder: why its package could not be built
_FAILED: set[Path] = set()  # keys that failed in this process
_LOADER: dict[str, bool] = {}  # device name -> whether torch's package loader works there (loader_works)
# A one-linear package, built and run in a child process: loader_works' probe.
_PROBE = """
import sys, torch
device = torch.device(sys.argv[1])
torch.manual_seed(0)
linear, x = torch.nn.Linear(16, 16).to(device).eval(), torch.randn(4, 16).to(device)
with torch.no_grad():
    program = torch.export.export(linear, (x,), strict=False)
    path = torch._inductor.aoti_compile_and_package(program, package_path=sys.argv[2])
    index = -1 if device.type == "cpu" else device.index or 0
    runner = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, index)
    assert torch.allclose(runner.run([x])[0], linear(x), atol=1e-3), "wrong values"
print("ok")
"""


class _Functional(nn.Module):
    """The block as a function of (weights..., inputs...), for torch.export."""

    def __init__(self, block: nn.Module, names: list[str], layout: Layout, forward: Callable[..., Any]) -> None:
        super().__init__()
        # not a submodule: export would lift the block's own tensors into the package as constants
        object.__setattr__(self, "block", block)
        self.names, self.layout, self.forward_fn = names, layout, forward

    def forward(self, *flat: Tensor) -> tuple[Tensor, ...]:
        n = len(self.names)
        weights = dict(zip(self.names, flat[:n], strict=True))
        args = unflatten(self.layout, list(flat[n:]))
        # functional_call would go through the block's __call__, which is this package's stand-in
        with torch.nn.utils.stateless._reparametrize_module(self.block, weights):  # type: ignore[attr-defined]
            out = self.forward_fn(*args)
        return tuple(torch.utils._pytree.tree_flatten(out)[0])


# -- a package's shapes ----------------------------------------------------------------------------------------------

_EXPR_NAMES: dict[str, Any] = {"Max": max, "Min": min, "floor": math.floor, "ceiling": math.ceil,
                               "FloorDiv": lambda a, b: a // b, "Mod": lambda a, b: a % b}


@dataclass
class _Variant:
    """One saved package of a key: the shapes it accepts, its output structure and its loaded runner."""

    dims: list[list[int | str]]  # per tensor input (weights excluded): an int, or a symbolic expression
    ranges: dict[str, list[int | None]]
    out_spec: str
    path: Path
    runner: Any = field(default=None, repr=False)
    spec: Any = field(default=None, repr=False)  # out_spec, parsed on first use

    def is_dynamic(self) -> bool:
        return any(isinstance(d, str) for dims in self.dims for d in dims)

    def accepts(self, tensors: list[Tensor]) -> bool:
        if len(tensors) != len(self.dims):
            return False
        bound: dict[str, int] = {}
        deferred: list[tuple[str, int]] = []
        for t, dims in zip(tensors, self.dims, strict=True):
            if t.dim() != len(dims):
                return False
            for size, dim in zip(t.shape, dims, strict=True):
                if isinstance(dim, int):
                    if size != dim:
                        return False
                elif dim.isidentifier():
                    if bound.setdefault(dim, size) != size:
                        return False
                else:
                    deferred.append((dim, size))
        for name, (low, high) in self.ranges.items():
            value = bound.get(name)
            if value is not None and (value < (low or 0) or (high is not None and value > high)):
                return False
        try:
            return all(eval(expr, {"__builtins__": {}, **_EXPR_NAMES}, dict(bound)) == size  # noqa: S307
                       for expr, size in deferred)
        except Exception:  # an expression this check cannot read: never run the package on a guess
            return False

    def load(self, device: torch.device) -> None:
        if self.runner is None:
            index = -1 if device.type == "cpu" else (device.index if device.index is not None
                                                     else torch.cuda.current_device())
            self.runner = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, index)

    def run(self, inputs: list[Tensor]) -> Any:
        outs = self.runner.run(inputs)
        if self.spec is None:
            self.spec = torch.utils._pytree.treespec_loads(self.out_spec)
        return torch.utils._pytree.tree_unflatten(outs, self.spec)


def _shape_of(size: Any) -> int | str:
    if isinstance(size, int):
        return size
    expr = size.node.expr
    return int(expr) if expr.is_number else str(expr)


def _build(block: nn.Module, forward: Callable[..., Any], names: list[str], weights: list[Tensor], layout: Layout,
           tensors: list[Tensor], folder: Path, *, dynamic: bool) -> _Variant:
    """Export the block for this call's shapes (dynamic: every input size symbolic where the trace allows),
    compile it with AOTInductor and save it in `folder` as one more variant of its key."""
    from torch._inductor import aoti_compile_and_package
    from torch.export import Dim, export

    # the structure of the block's output, which the package returns flat (one eager call: export keeps nothing
    # its traced forward records)
    out_spec = torch.utils._pytree.treespec_dumps(torch.utils._pytree.tree_flatten(
        forward(*unflatten(layout, tensors)))[1])
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), pytorch_forms():
        # torch's own pytree code warns about its own deprecated form while exporting: nothing a user can act on
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        # export traces ordinary tensors: the denoise loop's are inference tensors
        example = [t.clone() for t in (*weights, *tensors)]
        # sizes 0 and 1 would be specialised anyway (with a logged warning each)
        shapes = None if not dynamic else (tuple([None] * len(weights) + [
            {d: Dim.AUTO for d, size in enumerate(t.shape) if size > 1} for t in tensors]),)  # one *flat
        functional = _Functional(block, names, layout, forward)
        program = export(functional, tuple(example), dynamic_shapes=shapes, strict=False)
        del example
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
        user = placeholders[len(placeholders) - len(tensors):]
        dims = [[_shape_of(s) for s in n.meta["val"].shape] for n in user]
        ranges = {str(sym): [int(r.lower) if math.isfinite(float(r.lower)) else None,
                             int(r.upper) if math.isfinite(float(r.upper)) else None]
                  for sym, r in program.range_constraints.items()}
        folder.mkdir(parents=True, exist_ok=True)
        stem = uuid.uuid4().hex[:12]
        staging = folder / f".{stem}.partial.pt2"  # the packager wants the suffix
        try:
            aoti_compile_and_package(program, package_path=str(staging))
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
    path = folder / f"{stem}.pt2"
    staging.replace(path)
    variant = _Variant(dims, ranges, out_spec, path)
    meta = folder / f"{stem}.json"
    meta.with_suffix(".json.partial").write_text(json.dumps({"dims": dims, "ranges": ranges, "out_spec": out_spec}))
    meta.with_suffix(".json.partial").replace(meta)  # the JSON last: a variant is listed only when whole
    return variant


def _saved_variants(folder: Path) -> list[_Variant]:
    variants = []
    for meta in sorted(folder.glob("*.json")):
        path = meta.with_suffix(".pt2")
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if path.is_file():
            variants.append(_Variant(data["dims"], data["ranges"], data["out_spec"], path))
    return sorted(variants, key=_Variant.is_dynamic)  # an exact fit first: static shapes make the faster kernels


# -- the block's forward ---------------------------------------------------------------------------------------------


class PackagedForward:
    """Stands in for a block's forward: the saved package for the call's key and shapes when there is one, else
    builds and saves one; torch.compile where a package cannot serve (see the module docstring)."""

    def __init__(self, block: nn.Module, cache: Path, shared: dict[str, list[_Variant]]) -> None:
        self.block, self.cache, self.shared = block, cache, shared
        self.forward = block.forward
        self.signature = inspect.signature(self.forward)
        self._keys: dict[Any, str] = {}
        self._ids: tuple[int, ...] = ()
        self._slots: list[tuple[nn.Module, str, str, str]] = []
        self._state: list[tuple[nn.Module, str]] = []
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return self._fallback(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        tensors_in = [v for v in bound.arguments.values() if isinstance(v, Tensor)]
        device = tensors_in[0].device if tensors_in else torch.device("cpu")
        # The block's tensors, fetched through slots found once per arrangement of its submodules (a LoRA
        # attached or detached, FP8 linears swapped in make a new one): walking named_parameters and named_buffers
        # on every call cost ~50 us of the ~150 us this call took on a 2-core CPU.
        ids = module_ids(self.block)
        if ids != self._ids:
            self._ids, self._slots = ids, tensor_slots(self.block)
            self._state = [(m, a) for m in self.block.modules() for a in getattr(type(m), "packaged_state", ())]
        weights = [getattr(module, kind)[name] for module, kind, name, _ in self._slots]
        # attributes their classes say change after loading (which LoRA branches are on): part of the structure
        state = tuple(tuple(map(id, v)) if isinstance(v := getattr(m, a), list | tuple) else v
                      for m, a in self._state)
        try:
            layout, tensors = flatten(bound.arguments, device)
            key = self._key((ids, state), weights, layout, tensors, device)
        except Unpackageable:
            return self._fallback(*args, **kwargs)
        names = [full for *_, full in self._slots]
        folder = self.cache / key
        if folder in _FAILED:
            return self._fallback(*args, **kwargs)
        variants = self.shared.get(key)
        if variants is None:  # the key's first call in this process
            if (folder / _FAILURE).exists():
                _FAILED.add(folder)
                return self._fallback(*args, **kwargs)
            variants = self.shared[key] = _saved_variants(folder)
        variant = next((v for v in variants if v.accepts(tensors)), None)
        try:
            if variant is None:
                # As torch.compile does: static shapes first (the faster kernels; a cron job's shapes never
                # change), symbolic ones once a second shape shows up, so a prompt file does not build a package
                # per prompt.
                variant = _build(self.block, self.forward, names, weights, layout, tensors, folder,
                                 dynamic=bool(variants))
                if not variant.accepts(tensors):
                    raise RuntimeError(f"the package's own shapes do not fit the call they were traced from: "
                                       f"{variant.dims}")
                variants.append(variant)
                variants.sort(key=_Variant.is_dynamic)
            variant.load(device)
        except Exception as e:  # noqa: BLE001 - a package that cannot be built or loaded leaves it to torch.compile
            # out of memory while building (export copies the block's weights once) may not happen next time
            self._give_up(folder, e, remember=not isinstance(e, torch.OutOfMemoryError))
            return self._fallback(*args, **kwargs)
        try:
            return variant.run([*weights, *tensors])
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # a check the package makes and this key's shapes do not (an export guard)
            self._give_up(folder, e, remember=False)  # this process only: the package may serve other runs
            return self._fallback(*args, **kwargs)

    def _give_up(self, folder: Path, error: Exception, remember: bool = True) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        _FAILED.add(folder)
        try:  # remembered, so later processes go straight to torch.compile instead of failing again
            if remember:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / _FAILURE).write_text(reason + "\n")
        except OSError:
            pass
        warnings.warn(f"could not package the compiled {type(self.block).__name__} ({reason}); using "
                      f"torch.compile for it (delete {folder} to try again)", stacklevel=3)

    def _key(self, ids: Any, weights: list[Tensor], layout: Layout, tensors: list[Tensor],
             device: torch.device) -> str:
        # the block's structure is described once per arrangement of its submodules and tensors, not once per call
        try:
            hash(layout)
            arguments: Any = layout
        except TypeError:  # a constant argument that does not hash
            arguments = json.dumps(describe(list(layout.entries)))
        token = (ids, tuple((t.shape, t.dtype) for t in weights), arguments, tuple(t.dtype for t in tensors),
                 kernel_ids())
        cached = self._keys.get(token)
        if cached is None:
            described = {"block": structure(self.block), "forward": callable_name(self.forward),
                         "layout": [layout.names, describe(list(layout.entries))],
                         "inputs": [[str(t.dtype), t.dim()] for t in tensors], "kernels": process_kernels(),
                         "device": _device_name(device), "code": code_version()}
            digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]
            cached = self._keys[token] = f"{type(self.block).__name__}-{digest}"
        return cached

    def _fallback(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            compile_blocks([])  # the cache folders and the dynamo cache size, as for compile_blocks
            self._compiled = torch.compile(self.forward, fullgraph=True)
        return self._compiled(*args, **kwargs)


def packages_work(device: torch.device) -> bool:
    """Whether package_blocks runs blocks on `device` from packages (else it compiles them)."""
    # the CPU's loader is the one the test suite runs
    return device.type == "cpu" or loader_works(device, prepare_compiler() / "aoti")


def loader_works(device: torch.device, cache: Path) -> bool:
    """Whether torch's package loader runs a package on this (non-CPU) device. A loader that crashes takes its
    process with it, and one did: on the H200 machine (torch 2.11 with CUDA 13) even a one-linear CUDA package,
    loaded by torch's own aoti_load_package, died with SIGSEGV. So the first use on a device, torch and CUDA
    version builds and runs a tiny package in a child process (~1 min, once), and the verdict is kept in
    `cache` (loader-<digest>.json) for later processes; where it fails, --compile uses torch.compile."""
    name = _device_name(device)
    known = _LOADER.get(name)
    if known is not None:
        return known
    record = cache / f"loader-{hashlib.sha256(f'{name}:{torch.__version__}'.encode()).hexdigest()[:16]}.json"
    try:
        known = bool(json.loads(record.read_text())["works"])
    except (OSError, ValueError, KeyError, TypeError):
        reason = _probe(device)
        known = reason is None
        with contextlib.suppress(OSError):
            cache.mkdir(parents=True, exist_ok=True)
            partial = record.with_suffix(".partial")
            partial.write_text(json.dumps({"works": known, "reason": reason, "device": name,
                                           "torch": torch.__version__}))
            partial.replace(record)
        if not known:
            warnings.warn(f"torch's AOTInductor package loader fails on {name} with torch {torch.__version__} "
                          f"({reason}); --compile uses torch.compile there (delete {record} to test again)",
                          stacklevel=4)
    _LOADER[name] = known
    return known


def _probe(device: torch.device) -> str | None:
    """Build and run a one-linear package on `device` in a child process: None if it worked, else why not."""
    try:
        with tempfile.TemporaryDirectory(prefix="qimg-probe-") as work:
            done = subprocess.run([sys.executable, "-c", _PROBE, str(device), str(Path(work) / "probe.pt2")],
                                  capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    if done.returncode == 0 and done.stdout.strip().endswith("ok"):
        return None
    last = (done.stderr.strip().splitlines() or [""])[-1][:200]
    return f"the probe exited with {done.returncode}" + (f": {last}" if last else "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:{torch.cuda.get_device_name(device)}:sm{major}{minor}:cuda{torch.version.cuda}"
    return f"{device.type}:{sys.platform}"


def package_blocks(blocks: Iterable[nn.Module]) -> int:
    """Run each block through AOTInductor packages cached under $QIMG_HOME/compile/aoti (built on first use,
    loaded by later processes); returns the count. Blocks of one class share their packages. On a device where
    torch's package loader fails (loader_works), the blocks are compiled as compile_blocks does instead."""
    cache = prepare_compiler() / "aoti"
    blocks = list(blocks)
    devices = {t.device for block in blocks for t in itertools.islice(itertools.chain(block.parameters(),
                                                                                        block.buffers()), 1)}
    if not all(packages_work(device) for device in devices):
        return compile_blocks(blocks)
    shared: dict[str, list[_Variant]] = {}
    for block in blocks:
        block.forward = PackagedForward(block, cache, shared)  # type: ignore[method-assign]
    return len(blocks)


def packages_apply(resident: bool, parallel: Any) -> bool:
    """Whether `--compile` runs the denoiser's blocks from packages: its weights resident (block streaming binds
    them inside the block call, which a package cannot see), no sequence parallelism (collectives inside the
    blocks), and not turned off with QIMG_COMPILE_PACKAGES=0."""
    return (resident and getattr(parallel, "seq_group", None) is None
            and os.environ.get("QIMG_COMPILE_PACKAGES", "1") != "0")
