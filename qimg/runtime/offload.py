"""Weights that live in host memory and visit the GPU, applied from outside the nets (the host copies
themselves: runtime/host_copies.py).

- Offloaded is one component (the transformer, the text encoder) whose tensors live in HostCopy buffers:
  `to_device()` uploads its resident part, `off_device()` drops it. Weights never change during inference, so
  taking a component off the GPU is free: its tensors are rebound to their host views and the device copy is
  dropped; putting it back is one host-to-device copy. When it has repeated blocks that do not all fit, the
  chosen ones stay resident and the others stream through a few device slots: while one block computes, the
  next streamed block copies into a free slot on a side CUDA stream, so the transfer hides behind compute.
- With backward=True (LoRA training) the streamed blocks are visited again in reverse while their checkpointed
  activations are recomputed during backward, so a step copies each streamed block in twice, in the order
  forward then backward; a block's weights stay bound until the next visit starts, since its backward runs
  after its (re)computation returns.
- Residency switches components between the phases of a run (encode, denoise, decode) as a plan says.
- Weights that do change (a merged LoRA, a swapped-in module) are packed again with `Offloaded.repack`.
- Blocks given as FileBlocks keep no host copy while resident; streamed ones get their pinned copy the first
  time the component comes on, not at load, so a run that encodes its prompts first never holds the text
  encoder's and the denoiser's copies at once.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qimg.runtime.checkpoint import is_checkpointed, wrap_inside
from qimg.runtime.host_copies import FileBlock, HostCopy, module_tensors


class _Copier:
    """Host-to-device copies on a side CUDA stream, ordered against compute with events; plain copies on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.device = device

    def event(self) -> torch.cuda.Event | None:
        return torch.cuda.Event() if self.cuda else None

    def copy(self, copy: HostCopy, flat: Tensor, after: torch.cuda.Event | None, done: torch.cuda.Event | None) -> None:
        if not self.cuda:
            flat[: copy.nbytes].copy_(copy.host)
            return
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            flat[: copy.nbytes].copy_(copy.host, non_blocking=True)
            done.record(self.stream)

    def wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def mark(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.record(torch.cuda.current_stream(self.device))


@dataclass
class StreamLog:
    """What the streamer did, in order (tests read it; kept short)."""

    events: list[tuple[str, int, int]] = field(default_factory=list)
    enabled: bool = False

    def add(self, what: str, block: int, slot: int) -> None:
        if self.enabled:
            self.events.append((what, block, slot))


class Offloaded:
    """One component kept in host memory; `to_device()` brings its resident part to the GPU.

    blocks: the component's repeated blocks in run order (one nn.ModuleList, or several lists joined), of which
    `streamed` (indices) run through `slots` device buffers instead of staying resident. Without blocks the
    whole component moves as one piece. files: blocks given as FileBlocks (no host copy while resident).
    """

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        blocks: Sequence[nn.Module] | None = None,
        *,
        block_copies: dict[int, HostCopy] | None = None,
        files: dict[int, FileBlock] | None = None,
        slots: int = 2,
    ) -> None:
        self.module, self.device = module, torch.device(device)
        self.blocks = list(blocks) if blocks is not None else []
        copies = dict(block_copies or {})
        # files: blocks read from the checkpoint on demand; one gets a host copy only once it streams.
        self.files = dict(files or {})
        self.block_copies: list[HostCopy | None] = [
            copies.get(i) or (None if i in self.files else HostCopy(module_tensors(b)))
            for i, b in enumerate(self.blocks)
        ]
        self._from_file: set[int] = set()  # blocks whose host copy holds what their FileBlock reads, unchanged
        self.rest = HostCopy(module_tensors(module, skip=self.blocks))
        self.slots_wanted = slots
        self.streamed: list[int] = []
        self.backward = False
        self._wrapped: set[int] = set()
        self.on_device = False
        self.log = StreamLog()
        self._flats: list[Tensor] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def stream(self, streamed: Sequence[int], *, backward: bool = False) -> None:
        """Stream these blocks (indices) through the slots; the others stay resident while on the device.
        backward: the blocks also run in backward (training); each streamed block must be checkpointed
        (runtime/checkpoint.py) before this, so that its backward recomputes it with its weights streamed back
        instead of holding them."""
        streamed = sorted(set(streamed))
        if backward:
            plain = [i for i in streamed if not is_checkpointed(self.blocks[i])]
            if plain:
                raise ValueError(f"blocks {plain[:3]} stream in training without gradient checkpointing: their "
                                 "backward would read weights that have left the device")
        was_on = self.on_device
        self.off_device()
        self.streamed, self.backward = streamed, backward
        for i in self._from_file - set(streamed):  # resident now: the checkpoint gives it back, the copy can go
            self.files[i].drop()
            self.block_copies[i] = None
            self._from_file.discard(i)
        for i in streamed if backward else ():
            if i not in self._wrapped:
                wrap_inside(self.blocks[i], lambda forward, i=i: self._visiting(i, forward))
                self._wrapped.add(i)
        if was_on:
            self.to_device()

    @torch.inference_mode(False)
    def repack(self, blocks: Iterable[int] | None = None, *, rest: bool = False) -> None:
        """Pack the given blocks (and, with rest=True, the non-block part) into host memory again from their
        current tensors, after their weights or modules changed (a LoRA merged, FP8 linears re-quantised), on
        or off the device. blocks=None repacks every block. The component comes back on the device if it was.
        """
        was_on = self.on_device
        if was_on and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the values copied must be final
        # New copies first: they read the tensors where they are now (device views included), so nothing
        # changed on the device is lost when off_device() rebinds everything to host memory.
        for i in range(len(self.blocks)) if blocks is None else blocks:
            if self.block_copies[i] is None:
                self.files[i].fill(self.blocks[i])  # read first when off the device (a no-op when resident on it)
            self.block_copies[i] = HostCopy(module_tensors(self.blocks[i]))
            # Its weights or modules may differ from the checkpoint's from now on: the copy is the only source.
            self.files.pop(i, None)
            self._from_file.discard(i)
        if rest:
            self.rest = HostCopy(module_tensors(self.module, skip=self.blocks))
        self.off_device()
        if was_on:
            self.to_device()

    def hold(self, blocks: Iterable[int]) -> None:
        """Give these blocks a host copy (reading those that only the checkpoint holds), before their modules
        change (a LoRA attached): what loads from the checkpoint would no longer be their weights."""
        self.repack([i for i in blocks if i in self.files])

    @property
    def host_bytes(self) -> int:
        """Bytes of this component's host copies."""
        return self.rest.nbytes + sum(c.nbytes for c in self.block_copies if c is not None)

    def _copy(self, i: int) -> HostCopy:
        copy = self.block_copies[i]
        assert copy is not None, f"block {i} streams without a host copy"
        return copy

    @torch.inference_mode(False)  # device buffers must be normal tensors: parameters get rebound to them
    def to_device(self) -> None:
        if self.on_device:
            return
        streamed = set(self.streamed)
        for i in self.streamed:
            if self.block_copies[i] is None:
                # A streamed block's first visit: read it to the device, prepare it, pack it into host memory.
                self.files[i].fill(self.blocks[i])
                self.block_copies[i] = HostCopy(module_tensors(self.blocks[i]))
                self.files[i].filled = False  # its tensors are host views now
                self._from_file.add(i)
        # One buffer for the rest and the resident blocks: a single allocation, then one copy per piece.
        pieces = [self.rest] + [c for i, c in enumerate(self.block_copies) if i not in streamed and c is not None]
        flat = torch.empty(sum(p.nbytes for p in pieces), dtype=torch.uint8, device=self.device)
        offset = 0
        for piece in pieces:
            piece.upload(flat[offset : offset + piece.nbytes])
            offset += piece.nbytes
        for i, c in enumerate(self.block_copies):
            if c is None and i not in streamed:
                self.files[i].fill(self.blocks[i])  # straight from the checkpoint to the device
        self._flats = [flat]
        if self.streamed:
            self._start_streaming()
        self.on_device = True

    def off_device(self) -> None:
        if not self.on_device:
            return
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # no kernel may still read a buffer we drop
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._bound = None
        self.rest.release()
        for i, copy in enumerate(self.block_copies):
            if copy is not None:
                copy.release()
            else:
                self.files[i].drop()  # read again on the next visit
        self._flats.clear()
        self._slots: list[Tensor] = []
        # The per-slot views hold the slot buffers too: dropping only the slots list kept every streamed
        # component's slots allocated through later phases (2 GiB of FLUX's 8 GiB budget, found on an H200).
        self._views: dict[tuple[int, int], list[Tensor]] = {}
        self.on_device = False

    # -- block streaming --------------------------------------------------------------------------------------

    def _start_streaming(self) -> None:
        n_slots = min(self.slots_wanted, len(self.streamed) * (2 if self.backward else 1))
        size = max(self._copy(i).nbytes for i in self.streamed)
        self._slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        self._views = {
            (s, i): self._copy(i).views(self._slots[s]) for s in range(n_slots) for i in self.streamed
        }
        self._copier = _Copier(self.device)
        self._ready = [self._copier.event() for _ in range(n_slots)]  # slot filled
        self._free = [self._copier.event() for _ in range(n_slots)]  # slot's last reader finished
        self._rank = {block: r for r, block in enumerate(self.streamed)}
        if self.backward:
            self._visits = list(self.streamed)
            self._restart_visits()
            self._hooks.append(self.module.register_forward_pre_hook(self._on_pass))
            return
        self._restart()
        self._hooks.append(self.module.register_forward_pre_hook(self._on_forward))
        for i in self.streamed:
            block = self.blocks[i]
            self._hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: self._before(i)))
            self._hooks.append(block.register_forward_hook(lambda m, a, o, i=i: self._after(i)))

    def _restart(self) -> None:
        # Copies and runs both go round the slots in one order (FIFO), counted across forwards: with a streamed
        # count that the slot count does not divide, the wrapped-around prefetch still lands in the slot that
        # the next run reads.
        n_slots = len(self._slots)
        self._next = 0  # rank the next block to run should have
        self._issued = self._ran = 0
        self._filled: list[int | None] = [None] * n_slots  # rank whose copy was issued into each slot
        self._free_recorded = [False] * n_slots
        for r in range(n_slots):
            self._issue(r)

    def _issue(self, rank: int) -> None:
        slot = self._issued % len(self._slots)
        self._issued += 1
        block = self.streamed[rank]
        after = self._free[slot] if self._free_recorded[slot] else None
        self._copier.copy(self._copy(block), self._slots[slot], after, self._ready[slot])
        self._filled[slot] = rank
        self.log.add("copy", block, slot)

    def _on_forward(self, module: nn.Module, args: tuple) -> None:
        if self._next != 0:
            # The last forward stopped part way (an exception, Ctrl-C): start the pipeline over.
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._restart()

    def _before(self, block: int) -> None:
        rank = self._rank[block]
        slot = self._ran % len(self._slots)
        if rank != self._next or self._filled[slot] != rank:
            raise RuntimeError(f"block {block} ran out of the streaming order (expected rank {self._next})")
        self._copier.wait(self._ready[slot])
        self._copy(block).bind(self._views[(slot, block)])
        self.log.add("run", block, slot)

    def _after(self, block: int) -> None:
        rank = self._rank[block]
        slot = self._ran % len(self._slots)
        self._ran += 1
        self._copier.mark(self._free[slot])
        self._free_recorded[slot] = True
        self._copy(block).release()
        n = len(self.streamed)
        self._next = (rank + 1) % n
        # Refill this slot with the block that comes `slots` later, wrapping into the next forward, so the first
        # streamed blocks of the next step are already on their way while the sampler does its arithmetic.
        self._issue((rank + len(self._slots)) % n)


    # -- streaming through forward and backward (training) ---------------------------------------------------------
    # Visits: the streamed blocks in forward order, then (with grad enabled) in reverse as backward recomputes
    # them. Copies go into the slots in visit order, one visit ahead; a slot is refilled when the visit after
    # the one that used it starts, which is after that block's backward has been queued.

    def _pass_visits(self) -> list[int]:
        forward = list(self.streamed)
        return forward + forward[::-1] if torch.is_grad_enabled() else forward

    def _restart_visits(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if getattr(self, "_bound", None) is not None:
            self._copy(self._bound).release()
        self._bound: int | None = None
        self._visits = self._pass_visits()
        self._v = 0  # visits started in this pass
        self._ran = self._issued = 0
        self._pending: collections.deque[int] = collections.deque()  # blocks copied in, not yet run, in order
        self._free_recorded = [False] * len(self._slots)
        for k in range(len(self._slots) - 1):
            self._issue_block(self._visits[k % len(self._visits)])

    def _issue_block(self, block: int) -> None:
        slot = self._issued % len(self._slots)
        self._issued += 1
        after = self._free[slot] if self._free_recorded[slot] else None
        self._copier.copy(self._copy(block), self._slots[slot], after, self._ready[slot])
        self._pending.append(block)
        self.log.add("copy", block, slot)

    def _on_pass(self, module: nn.Module, args: tuple) -> None:
        wanted = self._pass_visits()
        ahead = list(self._pending)
        if self._v != 0 or ahead != [wanted[k % len(wanted)] for k in range(len(ahead))]:
            # The last pass stopped part way (an exception, a forward whose backward never ran) or the copies
            # in flight are not this pass's first blocks: start over.
            self._restart_visits()
        self._visits = wanted

    def _visiting(self, block: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if self.on_device and self.backward and block in self._rank:
                self._visit(block)
            return forward(*args, **kwargs)

        return run

    def _visit(self, block: int) -> None:
        n_slots = len(self._slots)
        if self._bound is not None:
            # The previous visit's block (its recomputation and its backward, in training) is queued: its slot
            # may be refilled once the work queued so far is done.
            self._copy(self._bound).release()
            self._bound = None
            prev = (self._ran - 1) % n_slots
            self._copier.mark(self._free[prev])
            self._free_recorded[prev] = True
        n = len(self._visits)
        self._issue_block(self._visits[(self._v + n_slots - 1) % n])
        expected = self._pending.popleft()
        if expected != block:
            raise RuntimeError(f"block {block} ran out of the streaming order (expected block {expected})")
        slot = self._ran % n_slots
        self._ran += 1
        self._copier.wait(self._ready[slot])
        self._copy(block).bind(self._views[(slot, block)])
        self._bound = block
        self.log.add("run", block, slot)
        self._v = (self._v + 1) % n


class Residency:
    """Which offloaded components are on the device in each phase of a run ("encode", "denoise", "decode")."""

    def __init__(self, components: dict[str, Offloaded], phases: dict[str, set[str]]) -> None:
        self.components, self.phases = dict(components), phases
        self.phase: str | None = None

    def enter(self, phase: str) -> None:
        wanted = self.phases.get(phase, set(self.components))
        # Off first, then on: the peak never holds both the leaving and the arriving component.
        for name, comp in self.components.items():
            if name not in wanted:
                comp.off_device()
        if any(c.device.type == "cuda" for c in self.components.values()):
            torch.cuda.empty_cache()
        for name in wanted:
            if name in self.components:
                self.components[name].to_device()
        self.phase = phase

    def add(self, name: str, component: Offloaded) -> None:
        self.components[name] = component

    def drop(self, name: str) -> None:
        comp = self.components.pop(name, None)
        if comp is not None:
            comp.off_device()


def prepare_blocks(
    blocks: nn.ModuleList,
    work_device: torch.device,
    prepare: Callable[[str, nn.Module], None],
    *,
    keep: Callable[[int], bool],
    prefix: str = "",
) -> dict[int, HostCopy]:
    """Run `prepare` (FP8 quantisation, say) on each block on `work_device`, one block at a time, then keep the
    block there (`keep(i)`) or pack it into host memory; returns the host copies made. Peak device memory is one
    block beyond what is kept."""
    copies = {}
    for i, block in enumerate(blocks):
        copy = prepare_block(block, work_device, prepare, keep=keep(i), prefix=f"{prefix}{i}.")
        if copy is not None:
            copies[i] = copy
    return copies


def prepare_block(block: nn.Module, work_device: torch.device, prepare: Callable[[str, nn.Module], None], *,
                  keep: bool, prefix: str) -> HostCopy | None:
    """prepare_blocks for one block (a loader that reads block by block calls it as each block arrives): prepare
    it on `work_device`, then keep it there, or pack it into host memory and return the copy."""
    block.to(work_device)
    prepare(prefix, block)
    return None if keep else HostCopy(module_tensors(block))
