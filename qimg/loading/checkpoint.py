"""Meta-device builds and strict safetensors loading, single-file or sharded, with a readable key report."""

from __future__ import annotations

import contextlib
import fnmatch
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from qimg.errors import CheckpointError, ConfigError, ModelNotFoundError
from qimg.loading.reader import Entry, Reader, file_entries

P = TypeVar("P")
M = TypeVar("M", bound=nn.Module)
# (block, device): fill `block` (the group's module as built, or a copy of it) from the checkpoint on `device`.
GroupFill = Callable[[nn.Module, torch.device], None]


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON config, turning a missing or broken file into a one-line error."""
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing", hint="point --model at a complete model folder (diffusers layout)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e})", hint="re-download the model") from e
    except RecursionError:  # "[[[[..." nested past the recursion limit
        raise ConfigError(f"{path} is not readable JSON (nested too deeply)", hint="re-download the model") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object", hint="re-download the model")
    return data


def params_from_config(
    cls: type[P],
    config: dict[str, Any],
    names: dict[str, str],
    ignored: Iterable[str] = (),
    where: str = "config",
    required: Iterable[str] = (),
) -> P:
    """Build a params dataclass from a diffusers config.json through a {config key: field} table.

    Keys starting with "_" and keys in `ignored` are skipped; any other unknown key is an error, because a
    silently ignored architecture key would build the wrong network.
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in names and k not in set(ignored))
    if unknown:
        raise ConfigError(
            f"{where} has keys qimg does not know: {', '.join(unknown)}",
            hint="this model variant is not supported yet; check the model folder",
        )
    absent = [k for k in required if config.get(k) is None]
    if absent:
        raise ConfigError(f"{where} lacks {', '.join(absent)}, which set the network's shape",
                          hint="the config is damaged or not a diffusers config; re-download the model")
    kwargs = {}
    for key, field_name in names.items():
        if key in config and config[key] is not None:
            value = config[key]
            kwargs[field_name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def safetensors_files(folder: Path, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The weight files of one component: `<stem>.safetensors`, or the shards its index names."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index} has no weight_map", hint="re-download the model")
        # Shards are files beside the index: never a path elsewhere ("../", "/etc/..."), nor a name a message
        # could not show on one line.
        bad = [name for name in weight_map.values() if not isinstance(name, str) or name in ("", ".", "..")
               or Path(name).name != name or "\\" in name or not name.isprintable()]
        if bad:
            raise ConfigError(f"{index} names a shard {str(bad[0])[:60]!r}, not a file name in {folder}",
                              hint="re-download the model")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        try:
            missing = [f.name for f in files if not f.is_file()]
        except OSError as e:  # a name longer than the filesystem allows, and the like
            raise ConfigError(f"{index} names a shard qimg cannot look up ({e.strerror})",
                              hint="re-download the model") from None
        if missing:
            raise ModelNotFoundError(
                f"{folder} is missing {len(missing)} shard(s) named in its index: {', '.join(missing[:3])}",
                hint="the download is incomplete; fetch the model again",
            )
        return files
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for ext in ("bin", "pt", "pth", "ckpt") for p in folder.glob(f"*.{ext}"))
    if pickles:  # a PyTorch pickle can run code when loaded: say why it is not read, not just that it is absent
        raise CheckpointError(
            f"{folder} holds only {', '.join(pickles[:2])}, no {stem}.safetensors; qimg reads safetensors only and "
            "never unpickles", hint="re-download the model's safetensors weights (qimg download fetches only those)")
    raise ModelNotFoundError(
        f"no weights in {folder} (expected {stem}.safetensors or its sharded index)",
        hint="point --model at a complete model folder (diffusers layout)",
    )


def _short(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def open_checkpoint(files: list[Path]) -> dict[str, Any]:
    """Tensor name -> open safetensors handle (memory-mapped; nothing is read until a tensor is asked for)."""
    where: dict[str, Any] = {}
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            why = repr(str(e))[1:-1]  # one line: the reason may quote a tensor name holding a newline
            raise CheckpointError(f"{path} is not a readable safetensors file ({why})", hint="re-download it") from e
        for name in handle.keys():
            where[name] = handle
    return where


def own_memory(tensor: Tensor) -> Tensor:
    """`tensor` in memory of its own where it is a CPU view at an offset that is not 64-byte aligned. safetensors
    (0.8) hands out views into the file's mapping at whatever offset the file puts a tensor, and a CPU matmul's
    result can depend on its operands' alignment (fp32 on an AMD EPYC host: the weights of a FLUX.1 file in BFL's
    layout gave another image than the same weights from the diffusers folder): a copy makes the result the one
    the weights give however they were stored."""
    if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def tensor_headers(files: list[Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype such as "BF16", shape), from the file headers alone."""
    out = {}
    for name, handle in open_checkpoint(files).items():
        view = handle.get_slice(name)
        out[name] = (view.get_dtype(), tuple(view.get_shape()))
    return out


class _SkipRandomInit(TorchFunctionMode):
    """Initialisation of meta tensors returns at once: on the meta device it fills nothing, yet torch runs it op by
    op through Python, each op a chance to wait for the GIL that the loading threads hold (building the VAE took
    0.8 s of the main thread on an H200 host, in torch.nn.init, bench/stack_sampler.py). torch.nn.init's functions
    reach torch function modes as themselves, so they are stopped whole. Modes are per thread: another thread's
    build is unaffected."""

    _RANDOM = frozenset({Tensor.uniform_, Tensor.normal_, Tensor.random_})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self._RANDOM or getattr(func, "__module__", None) == "torch.nn.init":
            target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
            if isinstance(target, Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules on the meta device (shapes only, for a load to fill) without their random initialisation."""
    with torch.device("meta"), _SkipRandomInit():
        yield


def load_module(
    build: Callable[[], M],
    files: list[Path],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    transform: Callable[[str, Tensor], Tensor] | None = None,
    known_unused: Iterable[str] = (),
    what: str = "checkpoint",
    group: Callable[[str], str | None] | None = None,
    on_group: Callable[[str, nn.Module], None] | None = None,
    rename: Mapping[str, str | None] | None = None,
    convert: Callable[[str, Tensor], Tensor] | None = None,
    hint: str | None = None,
    aliases: Iterable[str] = (),
    later: Callable[[str], bool] | None = None,
    on_later: Callable[[str, nn.Module, GroupFill], None] | None = None,
) -> M:
    """Build a module on the meta device and fill it from safetensors files, strictly.

    Every tensor the module needs must be present with the right shape, and every tensor in the files must be
    used, unless it matches a `known_unused` glob. `transform(name, tensor)` adapts stored tensors (for example
    3-D conv kernels to the 2-D ones an image-only network runs). Floating tensors are cast to `dtype`.

    Files in another key layout (a single-file checkpoint) give `rename`: stored key -> module name, or None for
    a tensor the caller reads itself (an FP8 scale, a marker); a key it lacks is unexpected, reported as stored.
    `convert(name, tensor)` then replaces the cast to `dtype` (it may keep FP8 values as stored or dequantise
    them); it keeps shapes, which are checked from the headers. `hint` replaces the mismatch error's hint.

    Tensors are read in parallel straight to `device` (loading/reader.py). With `group(name)` -> prefix (or
    None), they load one group at a time (the next group's reads overlapping this one's placing, so memory holds
    two groups, not the checkpoint) and `on_group(prefix, module)` runs right after each group is in place: FP8
    quantisation or packing into host memory then happens block by block. Names and (untransformed) shapes are
    checked from the headers before anything is read.

    `aliases` are names the module fills from another tensor (tied weights, as transformers ties T5's
    encoder.embed_tokens to shared): not read, and a file that stores them anyway is not refused for it; the
    caller ties them once loaded.

    A group for which `later(prefix)` holds is not read now: it stays on the meta device, and
    `on_later(prefix, module, fill)` gets the function that reads it (checked and cast as here) whenever the
    caller wants it, as often as it wants it: a block the memory plan keeps with no host copy of its own.
    """
    with meta_device():
        module = build()
    tied = set(aliases)
    expected = {k: v for k, v in module.state_dict().items() if k not in tied}
    unused = tuple(known_unused)
    where: dict[str, tuple[Any, str]] = {}  # module name -> (open file, key in it)
    unexpected: list[str] = []
    for key, handle in open_checkpoint(files).items():
        name = key if rename is None else rename.get(key, "")
        if name is None or name in tied:
            continue
        if name in expected:
            where[name] = (handle, key)
        elif not any(fnmatch.fnmatchcase(name or key, p) for p in unused):
            unexpected.append(key)
    misshapen: list[str] = []
    if transform is None:
        for name in expected:
            if name in where:
                shape = _shape(where[name])
                if shape != tuple(expected[name].shape):
                    misshapen.append(f"{name} {shape} != {tuple(expected[name].shape)}")
    missing = sorted(set(expected) - set(where))
    check_keys(what, missing, unexpected, misshapen, hint)
    _check_dtypes(what, where, expected)

    entries: dict[str, Entry] = {}
    for path in files:
        entries.update(file_entries(path))

    def finish(names: list[str], tensors: list[Tensor], to: torch.device | str = device,
               misshapen: list[str] = misshapen) -> dict[str, Tensor]:
        state = {}
        target = torch.device(to)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        for name, tensor in zip(names, tensors, strict=True):
            if transform is not None:
                tensor = transform(name, tensor)
            # every torch call, even a no-op .to(), lets go of the GIL and waits to get it back: with loading threads
            # running Python that wait is what a call costs, so calls that change nothing are not made
            if convert is not None:
                tensor = convert(name, tensor)
            elif dtype is not None and tensor.dtype != dtype and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if tuple(tensor.shape) != tuple(expected[name].shape):
                misshapen.append(f"{name} {tuple(tensor.shape)} != {tuple(expected[name].shape)}")
                continue
            state[name] = tensor if tensor.device == target else tensor.to(target)
        return state

    def reader_of(prefix: str, names: list[str]) -> GroupFill:
        def fill(block: nn.Module, to: torch.device) -> None:
            with Reader(to) as reader:
                tensors = reader.read([entries[where[name][1]] for name in names])
            bad: list[str] = []
            state = finish(names, tensors, to, bad)
            check_keys(what, [], [], bad, hint)
            lead = f"{prefix}."
            block.load_state_dict({n.removeprefix(lead): t for n, t in state.items()}, strict=True, assign=True)

        return fill

    groups: dict[str | None, list[str]] = {}
    for name in expected:
        groups.setdefault(group(name) if group else None, []).append(name)
    deferred = [p for p in groups if p is not None and later is not None and later(p)]
    for prefix in deferred:
        names = groups.pop(prefix)
        if on_later is not None:
            on_later(prefix, module, reader_of(prefix, names))
    # the groups in order, then the tensors outside any group; each group's reads start while the one before
    # it is being placed (on_group: FP8 quantisation, packing into host memory)
    order = [(prefix, names) for prefix, names in groups.items() if prefix is not None]
    # a module with load_state_dict hooks gets them: loaded through load_state_dict, which costs a visit of every
    # module per group (for 60 blocks, ~120k visits: 1.3 of 1.6 s of a small model's load on a 2-core CPU)
    hooked = any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks for m in module.modules())
    order.append((None, groups.get(None, [])))
    with Reader(device) as reader:
        pending = reader.submit(entries[where[name][1]] for name in order[0][1])
        for k, (prefix, names) in enumerate(order):
            tensors = [f.result() for f in pending]
            if k + 1 < len(order):
                pending = reader.submit(entries[where[name][1]] for name in order[k + 1][1])
            state = finish(names, tensors)
            del tensors
            if prefix is None:
                check_keys(what, [], [], misshapen, hint)
            if hooked:
                module.load_state_dict(state, strict=False, assign=True)
            else:
                assign_tensors(module, state)
            if prefix is not None and on_group is not None:
                on_group(prefix, module)
    return module


def assign_tensors(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """module.load_state_dict(state, strict=False, assign=True) for the names in `state` (checked by the caller:
    each names a parameter or persistent buffer of `module`), visiting only their owners: parameters become new
    Parameters of the loaded tensors keeping their requires_grad, buffers the tensors themselves."""
    owners: dict[str, nn.Module] = {}
    for name, tensor in state.items():
        path, _, attr = name.rpartition(".")
        owner = owners.get(path)
        if owner is None:
            owner = owners[path] = module.get_submodule(path) if path else module
        if attr in owner._parameters:
            old = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=True if old is None else old.requires_grad)
        elif attr in owner._buffers:
            owner._buffers[attr] = tensor
        else:
            raise KeyError(f"{name} names no parameter or buffer of {type(module).__name__}")


def _shape(entry: tuple[Any, str]) -> tuple[int, ...]:
    handle, key = entry
    return tuple(handle.get_slice(key).get_shape())


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _check_dtypes(what: str, where: dict[str, tuple[Any, str]], expected: dict[str, Tensor]) -> None:
    """Weights the network computes in floating point must be stored as floats: integer tensors there are a
    quantisation format qimg does not read (or a damaged file), and would fail deep inside a matmul."""
    wrong = sorted(
        (name, handle.get_slice(key).get_dtype())
        for name, (handle, key) in where.items()
        if expected[name].is_floating_point() and handle.get_slice(key).get_dtype() not in _FLOAT_DTYPES
    )
    if wrong:
        name, dtype = wrong[0]
        raise CheckpointError(
            f"{what}: {len(wrong)} tensor(s) are stored as {dtype}, not floating point (e.g. {name})",
            hint="qimg reads bf16/fp16/fp32 (and FP8) safetensors; re-download the model or convert the file",
        )


def check_keys(what: str, missing: list[str], unexpected: list[str], misshapen: list[str], hint: str | None = None
               ) -> None:
    """One CheckpointError listing every missing, unexpected and misshapen tensor of a component, if any."""
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_short(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_short(sorted(unexpected))})")
        if misshapen:
            parts.append(f"{len(misshapen)} with the wrong shape ({_short(misshapen)})")
        raise CheckpointError(
            f"{what} does not match the network: " + "; ".join(parts),
            hint=hint or "the files belong to another model or are incomplete; re-download the model",
        )
