"""LoRA adapters on a loaded pipeline: read a file in any dialect the family knows (loading/lora.py), attach it
to the denoiser as an unmerged side branch (runtime/lora.py), and keep streamed blocks' host copies current.

The side branch is exact and composes with everything applied at load: FP8 linears (the branch runs in the
compute dtype next to the FP8 base, never added into FP8 weights), offloaded and streamed blocks (the blocks an
adapter touches are packed again), compiled blocks (a changed block recompiles on its next call). Changing a
strength or removing an adapter never reloads the base model, and removal restores the base modules as they were.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qimg.errors import InputError
from qimg.loading.lora import LoKrModule, LoRAFile, read_lora
from qimg.loading.single_file import TransformerFile
from qimg.pipelines.family import BlockLists, Family
from qimg.runtime.lora import Kronecker, LoRALinear, attach_lora, detach_lora, set_lora_strength
from qimg.runtime.merge import Delta
from qimg.runtime.offload import Offloaded


@dataclass
class AttachedLoRA:
    """One adapter on the pipeline: where it came from, how strongly it applies, what matched."""

    name: str
    path: Path
    strength: float
    file: LoRAFile
    sha256: str
    merged: bool = False  # folded into the weights as the model loaded (read_for_merge), not a side branch

    def as_dict(self) -> dict[str, Any]:
        """What a PNG records about it (enough to find the same file and apply it the same way)."""
        info = self.file.describe()
        return {"name": self.name, "path": str(self.path), "scale": self.strength, "sha256": self.sha256,
                "dialect": self.file.dialect, "modules": len(self.file.modules), "ranks": info["ranks"],
                "alphas": info["alphas"], "unmatched": len(self.file.unmatched), "merged": self.merged}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class LoRAs:
    """The adapters attached to one denoiser, by name, in the order they were loaded."""

    def __init__(self, model: nn.Module, blocks: BlockLists, family: str, dtype: torch.dtype,
                 offload: Offloaded | None) -> None:
        self.model, self.blocks, self.family, self.dtype, self.offload = model, blocks, family, dtype, offload
        self.attached: dict[str, AttachedLoRA] = {}

    def linears(self) -> dict[str, tuple[int, int]]:
        return model_linears(self.model)

    def load(self, path: str | Path, strength: float = 1.0, name: str | None = None) -> LoRAFile:
        """Read and attach a LoRA file; returns what was read (its summary and any keys that matched nothing)."""
        path = Path(path).expanduser().absolute()  # not resolve(): a hub cache's file is a link to a hash
        lora = read_lora(path, self.linears(), self.family)
        name = name or self._free_name(path.stem)
        if name in self.attached:
            raise InputError(f"a LoRA named {name!r} is already loaded", hint="give another name, or unload it first")
        modules = {m: Kronecker(w.w1, w.w2, w.scale) if isinstance(w, LoKrModule) else (w.down, w.up, w.scale)
                   for m, w in lora.modules.items()}
        self._hold(modules)
        with torch.inference_mode(False), torch.no_grad():
            changed = attach_lora(self.model, name, modules, strength, dtype=self.dtype)
        self._repack(changed)
        self.attached[name] = AttachedLoRA(name, path, float(strength), lora, _sha256(path))
        return lora

    def set_strength(self, name: str, strength: float) -> None:
        self._known(name, changing=True)
        set_lora_strength(self.model, name, strength)  # buffers unchanged: host copies stay valid
        self.attached[name].strength = float(strength)

    def unload(self, name: str) -> None:
        self._known(name, changing=True)
        with torch.inference_mode(False), torch.no_grad():
            changed = detach_lora(self.model, name)
        self._repack(changed)
        del self.attached[name]

    def apply(self, wanted: Sequence[tuple[str | Path, float]]) -> list[LoRAFile]:
        """Make the attached adapters exactly `wanted` (path, strength): load what is missing, change strengths,
        unload the rest. Returns the files newly read (for their reports)."""
        by_path = {a.path: a for a in self.attached.values()}
        keep = {Path(p).expanduser().absolute(): float(s) for p, s in wanted}
        for attached in self.attached.values():  # checked first, so that a refused call changes nothing
            if attached.merged and keep.get(attached.path) != attached.strength:
                self._known(attached.name, changing=True)
        for attached in list(self.attached.values()):
            if attached.path not in keep:
                self.unload(attached.name)
        loaded = []
        for path, strength in keep.items():
            if path in by_path and by_path[path].name in self.attached:
                if by_path[path].strength != strength:
                    self.set_strength(by_path[path].name, strength)
            else:
                loaded.append(self.load(path, strength))
        return loaded

    def params(self) -> list[dict[str, Any]]:
        return [a.as_dict() for a in self.attached.values()]

    def record_merged(self, path: Path, strength: float, lora: LoRAFile) -> None:
        """Note a LoRA merged into the weights as the model loaded (for the PNG, and so that apply keeps it)."""
        name = self._free_name(path.stem)
        self.attached[name] = AttachedLoRA(name, path, float(strength), lora, _sha256(path), merged=True)

    def _known(self, name: str, changing: bool = False) -> None:
        if name not in self.attached:
            loaded = ", ".join(self.attached) or "none"
            raise InputError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        if changing and self.attached[name].merged:
            raise InputError(f"LoRA {name!r} was merged into the weights as the model loaded; its scale cannot "
                             "change and it cannot be removed without loading the model again",
                             hint="load with --lora-mode branch (qimg.load(..., lora_mode=\"branch\")) to switch "
                             "LoRAs on a loaded model")

    def _free_name(self, stem: str) -> str:
        name, n = stem, 2
        while name in self.attached:
            name, n = f"{stem}-{n}", n + 1
        return name

    def _hold(self, names: Iterable[str]) -> None:
        """Blocks read from the checkpoint on demand (resident under a plan that streams) get a host copy before an
        adapter wraps their linears: the wrapped block is no longer what the checkpoint holds."""
        if self.offload is None:
            return
        prefixes = {self.blocks.prefix(f"{name}.") for name in names}
        self.offload.hold(sorted(self.blocks.index(self.model, p) for p in prefixes if p is not None))

    def _repack(self, changed: Sequence[str]) -> None:
        """Streamed and offloaded blocks live in host copies made at load: pack the ones an adapter changed."""
        if self.offload is None or not changed:
            return
        prefixes = {self.blocks.prefix(f"{name}.") for name in changed}
        indices = sorted(self.blocks.index(self.model, p) for p in prefixes if p is not None)
        self.offload.repack(indices, rest=None in prefixes)


def model_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """A loaded denoiser's linear modules by name -> (out, in), wrapped or not (adapters keep the base's name)."""
    out = {}
    for name, module in model.named_modules():
        base = module.base if isinstance(module, LoRALinear) else module
        if name.endswith(".base") or not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            continue
        out[name] = (int(base.out_features), int(base.in_features))
    return out


def read_for_merge(wanted: Sequence[tuple[str | Path, float]], mode: str, family: Family, folder: Path,
                   weights: TransformerFile | None = None
                   ) -> tuple[list[tuple[Path, float, LoRAFile]], dict[str, list[tuple[Delta, float]]] | None]:
    """The LoRAs to merge into the denoiser as it loads (memory.load_denoiser's `merge`), read before it loads
    against the linears its config gives: the files as read, and module name -> [(delta, strength)]. Empty (and
    None) when they run as a side branch instead: mode "branch", or "auto" when a target is stored in FP8 by a
    single-file transformer (a merge would add the delta into e4m3 values; the branch keeps it exact)."""
    if mode == "branch" or not wanted:
        return [], None
    files = []
    deltas: dict[str, list[tuple[Delta, float]]] = {}
    linears = family.denoiser_linears(folder)
    for path, strength in wanted:
        path = Path(path).expanduser().absolute()
        lora = read_lora(path, linears, family.name)
        files.append((path, float(strength), lora))
        for module, adapter in lora.modules.items():
            deltas.setdefault(module, []).append((_delta_on(adapter), float(strength)))
    stored = set() if weights is None else weights.kept_fp8()
    clash = sorted(stored & set(deltas))
    if clash:
        if mode == "auto":
            return [], None
        raise InputError(f"{weights.path.name if weights else 'the transformer'} stores {len(clash)} of the LoRA's "
                         f"targets in FP8 (e.g. {clash[0]}): merging would round the LoRA into e4m3",
                         hint="use --lora-mode branch (auto picks it for such files)")
    return files, deltas


def _delta_on(adapter: Any) -> Delta:
    """The adapter's delta W built on the device asked for: a low-rank pair's product is formed there (on a GPU,
    microseconds), never as a dense fp32 matrix on the host first."""
    if isinstance(adapter, LoKrModule):
        return lambda device: adapter.dense_delta().to(device)
    return lambda device: (adapter.up.to(device, torch.float32) @ adapter.down.to(device, torch.float32)
                           ) * adapter.scale
