"""Host copies of weights, applied from outside the nets: a module's tensors packed into one host buffer, and
blocks that keep no host copy at all (read from the checkpoint on each visit). runtime/offload.py moves them
between host and device.

- HostCopy packs a module's tensors into one pinned host buffer and rebinds them (`tensor.data = view`) to it;
  `bind` points them at device views, `release` back at the host ones.
- FileBlock: a block kept without any host copy. Under a plan that streams, host memory is the scarce part (a
  32 GB desktop with an 8 GB card), so the blocks the plan keeps resident are read from the checkpoint straight
  to the device when the component comes on, and dropped when it goes off: a later phase reads them again (from
  the page cache when it holds them).
- Host buffers are pinned at their exact size (cudaHostRegister on a plain allocation): the caching pinned
  allocator behind `pin_memory=True` rounds each buffer up to a power of two (a 0.42 GiB FP8 block of
  Qwen-Image takes 0.5 GiB) and keeps freed buffers for reuse, so a freed text encoder never left host memory.
  HOST counts the bytes these buffers hold (now and at the peak), for tests and benchmarks.

Tensor identity is kept (only `.data` moves), so FP8 linears, compiled blocks and hooks see the same objects.
"""

from __future__ import annotations

import copy as copying
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

_ALIGN = 256  # byte alignment of each tensor inside a packed buffer (any dtype's view stays aligned)


def module_tensors(module: nn.Module, skip: Iterable[nn.Module] = ()) -> list[Tensor]:
    """A module's parameters and buffers, each once (tied weights share), leaving out the `skip` submodules."""
    skipped = {id(t) for m in skip for t in (*m.parameters(), *m.buffers())}
    seen: set[int] = set()
    out = []
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen and id(t) not in skipped:
            seen.add(id(t))
            out.append(t)
    return out


@dataclass
class HostBytes:
    """Bytes held by HostCopy buffers in this process: now, and the most at any time since reset()."""

    now: int = 0
    peak: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:  # the text encoder may load on a worker thread while the denoiser loads
            self.now += n
            self.peak = max(self.peak, self.now)

    def reset(self) -> None:
        with self._lock:
            self.peak = self.now


HOST = HostBytes()


def _unpin(buffer: Tensor, registered: bool, nbytes: int) -> None:
    """A host buffer's end: unregistered from CUDA before its memory can go back to the allocator (the finalizer
    holds `buffer`, so this always runs first), and taken off the count."""
    if registered:
        torch.cuda.synchronize()  # no copy may still read the pages being unpinned
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
    HOST.add(-nbytes)


def host_buffer(nbytes: int, pin: bool, owner: object) -> Tensor:
    """A flat host byte buffer, page-locked at its exact size when `pin` (falling back to the caching pinned
    allocator where registering fails), counted in HOST while `owner` lives."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    registered = False
    if pin and nbytes:
        # 1: cudaHostRegisterPortable (pinned for every device), as torch.cuda._pin_memory_utils registers.
        registered = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 1)) == 0
        if not registered:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    HOST.add(nbytes)
    # Not at exit: the process's memory goes with it, and CUDA may already be torn down by then.
    weakref.finalize(owner, _unpin, buffer, registered, nbytes).atexit = False
    return buffer


class HostCopy:
    """A group of tensors packed into one host buffer (pinned when a GPU is present), rebound to views of it."""

    @torch.inference_mode(False)
    def __init__(self, tensors: Sequence[Tensor], *, pin: bool | None = None) -> None:
        self.tensors = list(tensors)
        self.offsets, offset = [], 0
        for t in self.tensors:
            self.offsets.append(offset)
            offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.nbytes = offset
        pin = torch.cuda.is_available() if pin is None else pin
        self.host = host_buffer(self.nbytes, pin, self)
        self.host_views = self.views(self.host)
        for t, view in zip(self.tensors, self.host_views, strict=True):
            view.copy_(t.detach())
            t.data = view  # the old storage (device or pageable) is released with its last reference

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat byte buffer laid out like this copy, one per tensor, with its dtype and shape."""
        out = []
        for t, offset in zip(self.tensors, self.offsets, strict=True):
            n = t.numel() * t.element_size()
            out.append(flat[offset : offset + n].view(t.dtype).view(t.shape))
        return out

    def bind(self, views: Sequence[Tensor]) -> None:
        for t, view in zip(self.tensors, views, strict=True):
            t.data = view

    def upload(self, flat: Tensor) -> None:
        """Copy into a device buffer of at least nbytes and rebind the tensors to it."""
        flat[: self.nbytes].copy_(self.host, non_blocking=True)
        self.bind(self.views(flat))

    def release(self) -> None:
        """Point the tensors back at the host copy (the device buffer goes with its last reference)."""
        self.bind(self.host_views)


def named_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    """A module's parameters and buffers with their names, each tensor once."""
    seen: set[int] = set()
    out = []
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


class FileBlock:
    """A block whose weights come from the checkpoint each time it visits the device, with no host copy.

    load(module) fills `module` (the block as built, on the meta device) from the checkpoint on the device and
    prepares it as loading does (FP8 quantisation, merged LoRAs), in place. The first fill runs on the block
    itself; later ones on a fresh copy of `template` (the block as built), whose tensors the block's own tensors
    are then rebound to, so tensor identity holds (compiled blocks, hooks and adapters added since see the same
    objects). Only the tensors the first fill made are dropped: adapters attached later stay where they are.
    """

    def __init__(self, load: Callable[[nn.Module], None], template: nn.Module) -> None:
        self.load, self.template = load, template
        self.names: list[str] = []
        self.tensors: list[Tensor] = []
        self.shapes: list[torch.Size] = []
        self.filled = False  # the tensors hold the checkpoint's values on the device

    @torch.inference_mode(False)  # the device tensors get rebound as parameters' data: normal tensors only
    @torch.no_grad()
    def fill(self, block: nn.Module) -> None:
        if self.filled:
            return
        if not self.tensors:
            self.load(block)
            named = named_tensors(block)
            self.names, self.tensors = [n for n, _ in named], [t for _, t in named]
            self.shapes = [t.shape for t in self.tensors]
        else:
            fresh = copying.deepcopy(self.template)
            self.load(fresh)
            made = dict(named_tensors(fresh))
            for name, t, shape in zip(self.names, self.tensors, self.shapes, strict=True):
                new = made.get(name)
                if new is None or new.shape != shape or new.dtype != t.dtype:
                    raise RuntimeError(f"{name} of a block read on demand came back unlike its first load")
                t.data = new
        still_meta = [n for n, t in zip(self.names, self.tensors, strict=True) if t.is_meta]
        if still_meta:
            raise RuntimeError(f"the checkpoint does not fill {still_meta[0]} of a block read on demand")
        self.filled = True

    def drop(self) -> None:
        """Free the device memory of the tensors the checkpoint fills (each keeps its dtype and device, with no
        elements: a tensor's data cannot move to the meta device)."""
        for t in self.tensors:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        self.filled = False
