"""The memory plan: before anything loads, decide from the weight sizes, the request and a VRAM budget what stays
on the GPU, what streams from host memory, where the text encoder runs and whether the VAE must tile.

Pure arithmetic over byte counts (no torch), so every decision is unit-tested. A run has three phases:
"text" (prompt encoding), "vae" (encoding input images, decoding the result) and "denoise"; in the offload
modes each phase holds only what it needs, and a component that does not fit streams its repeated blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qimg.runtime.options import OFFLOAD_MODES as MODES

GiB = 1024**3
MiB = 1024**2
# Kept free of the budget: the CUDA caching allocator's rounding and fragmentation, cuBLAS / cuDNN workspaces.
HEADROOM = 640 * MiB
SLOTS = 2  # device buffers a streamed component cycles its blocks through (double buffering)


class PlanError(ValueError):
    """No placement fits the budget; the message says what would."""


@dataclass(frozen=True)
class RequestShape:
    """What a request asks of memory: its output size, whether CFG doubles the batch, the pixels of its
    reference images (edit models) and whether the text encoder runs (not with saved prompt embeddings)."""

    width: int = 1024
    height: int = 1024
    cfg: bool = True
    ref_pixels: int = 0
    text_encoder: bool = True


@dataclass(frozen=True)
class Footprint:
    """One component's device bytes: weights outside its repeated blocks, each block, and the peak activation
    memory while it runs."""

    rest: int
    blocks: tuple[int, ...] = ()
    act: int = 0

    @property
    def weights(self) -> int:
        return self.rest + sum(self.blocks)

    @property
    def block(self) -> int:
        return max(self.blocks, default=0)


@dataclass(frozen=True)
class Needs:
    """What a run needs on the device: the transformer, the VAE (decode and, for img2img / edit, encode), and the
    text encoder unless saved prompt embeddings replace it."""

    transformer: Footprint
    vae: Footprint  # act: untiled decode (or encode, whichever is larger)
    vae_tiled_act: int
    text_encoder: Footprint | None = None


@dataclass
class MemoryPlan:
    mode: str  # none | model | layer
    budget: int | None  # bytes; None: no limit was set
    text_encoder_device: str  # cuda | cpu
    vae_tiling: bool
    streamed: dict[str, tuple[int, ...]] = field(default_factory=dict)  # component -> streamed block indices
    phases: dict[str, set[str]] = field(default_factory=dict)  # phase -> components on the device
    peaks: dict[str, int] = field(default_factory=dict)  # phase -> expected device bytes
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)

    def describe(self, needs: Needs) -> list[str]:
        """Lines for --verbose: the mode, each component's placement, the expected peak per phase."""
        budget = "none" if self.budget is None else f"{self.budget / GiB:.1f} GiB"
        lines = [f"memory plan: offload {self.mode}, VRAM budget {budget}, expected peak {self.peak / GiB:.1f} GiB"]
        parts = {"transformer": needs.transformer, "text_encoder": needs.text_encoder}
        for name, fp in parts.items():
            if fp is None:
                lines.append(f"  {name}: not loaded (saved prompt embeddings)")
                continue
            if name == "text_encoder" and self.text_encoder_device == "cpu":
                lines.append(f"  {name}: runs on the CPU ({fp.weights / GiB:.1f} GiB in host memory)")
                continue
            streamed = self.streamed.get(name, ())
            where = "resident" if self.mode == "none" else "on the GPU in its phase, in host memory otherwise"
            if streamed:
                n = len(fp.blocks)
                lines.append(f"  {name}: {n - len(streamed)} of {n} blocks resident, {len(streamed)} streamed "
                             f"({sum(fp.blocks[i] for i in streamed) / GiB:.1f} GiB per pass)")
            else:
                lines.append(f"  {name}: {fp.weights / GiB:.1f} GiB, {where}")
        lines.append(f"  vae: {'tiled' if self.vae_tiling else 'whole image'}")
        lines += [f"  phase {p}: {', '.join(sorted(self.phases.get(p, ()))) or '-'}, ~{b / GiB:.1f} GiB"
                  for p, b in self.peaks.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return lines


def spread(count: int, chosen: int) -> list[int]:
    """`chosen` indices out of range(count), evenly spaced, so streamed blocks sit between resident ones and each
    transfer overlaps the compute of the resident blocks before it."""
    if chosen <= 0:
        return []
    return sorted({min(count - 1, int((j + 0.5) * count / chosen)) for j in range(chosen)})


def _streamed(fp: Footprint, room: int) -> tuple[int, ...] | None:
    """Blocks to stream so the component fits `room` bytes with its activations; None if even all streamed
    does not fit. Resident blocks cost their bytes once; streaming adds SLOTS device buffers."""
    if fp.weights + fp.act <= room:
        return ()
    n = len(fp.blocks)
    if n == 0:
        return None
    slots = min(SLOTS, n) * fp.block
    spare = room - fp.rest - fp.act - slots
    if spare < 0:
        return None
    resident = min(n, spare // fp.block) if fp.block else n
    return tuple(spread(n, n - resident))


def _resident_bytes(fp: Footprint, streamed: tuple[int, ...]) -> int:
    if not streamed:
        return fp.weights
    return fp.rest + sum(b for i, b in enumerate(fp.blocks) if i not in set(streamed)) + min(
        SLOTS, len(streamed)) * fp.block


def plan_memory(
    needs: Needs,
    *,
    budget: int | None,
    mode: str = "auto",
    text_encoder_device: str | None = None,
    vae_tiling: bool = False,
) -> MemoryPlan:
    """Place every component under `budget` bytes of device memory (None: no limit, everything resident unless
    a mode says otherwise). `mode` none keeps all resident; model swaps whole components per phase; layer also
    streams blocks of a component that does not fit; auto takes the first of these that fits."""
    if mode not in MODES:
        raise ValueError(f"offload mode {mode!r} is not one of {', '.join(MODES)}")
    room = None if budget is None else budget - HEADROOM
    te = needs.text_encoder
    te_dev = text_encoder_device or "cuda"
    te_gpu = te if (te is not None and te_dev == "cuda") else None
    t, vae = needs.transformer, needs.vae
    vae_act = needs.vae_tiled_act if vae_tiling else vae.act

    def fits(n: int) -> bool:
        return room is None or n <= room

    # none: everything resident at once.
    resident_all = t.weights + vae.weights + (te_gpu.weights if te_gpu else 0)
    none_peak = resident_all + max(t.act, vae_act, te_gpu.act if te_gpu else 0)
    if mode == "none" or (mode == "auto" and (fits(none_peak) or room is None)):
        tiling = vae_tiling
        if not fits(none_peak) and not vae_tiling:
            tiled_peak = resident_all + max(t.act, needs.vae_tiled_act, te_gpu.act if te_gpu else 0)
            if fits(tiled_peak):
                tiling, none_peak = True, tiled_peak
        if not fits(none_peak):
            raise PlanError(_too_small("--offload none", none_peak, budget, needs))
        everything = {"transformer", "vae"} | ({"text_encoder"} if te_gpu else set())
        return MemoryPlan("none", budget, te_dev, tiling, {}, {p: everything for p in ("text", "vae", "denoise")},
                          {"all": none_peak},
                          ["VAE tiled to fit the budget"] if tiling and not vae_tiling else [])

    assert room is not None or mode in ("model", "layer")
    # model / layer: each phase holds its own component (plus the small VAE).
    streamed: dict[str, tuple[int, ...]] = {}
    peaks: dict[str, int] = {}
    notes: list[str] = []
    order = ["model", "layer"] if mode == "auto" else [mode]
    for attempt in order:
        streamed, peaks, failed = {}, {}, None
        for name, fp in (("transformer", t), ("text_encoder", te_gpu)):
            if fp is None:
                continue
            full = fp.weights + fp.act + vae.weights
            if attempt == "model" or room is None:
                if not fits(full):
                    failed = name
                    break
                streamed[name] = ()
            else:
                s = _streamed(fp, room - vae.weights)
                if s is None:
                    failed = name
                    break
                streamed[name] = s
            peaks["text" if name == "text_encoder" else "denoise"] = (
                _resident_bytes(fp, streamed[name]) + fp.act + vae.weights)
        if failed is None:
            mode = attempt
            break
    else:
        fp = t if failed == "transformer" else te_gpu
        need = fp.rest + min(SLOTS, len(fp.blocks)) * fp.block + fp.act + vae.weights + HEADROOM
        raise PlanError(_too_small(f"--offload {order[-1]}", need, budget, needs, component=failed))

    t_resident = _resident_bytes(t, streamed.get("transformer", ()))
    tiling = vae_tiling
    vae_phase = {"vae"}
    if fits(t_resident + vae.weights + vae_act):
        vae_phase.add("transformer")  # no need to drop the transformer's resident blocks around VAE work
        peaks["vae"] = t_resident + vae.weights + vae_act
    elif fits(vae.weights + vae_act):
        peaks["vae"] = vae.weights + vae_act
    elif fits(vae.weights + needs.vae_tiled_act):
        tiling = True
        peaks["vae"] = vae.weights + needs.vae_tiled_act
        notes.append("VAE tiled to fit the budget")
    else:
        raise PlanError(_too_small("--tiled-vae", vae.weights + needs.vae_tiled_act + HEADROOM, budget, needs,
                                   component="vae"))
    phases = {"text": {"text_encoder", "vae"}, "denoise": {"transformer", "vae"}, "vae": vae_phase}
    return MemoryPlan(mode, budget, te_dev, tiling, streamed, phases, peaks, notes)


def _too_small(what: str, need: int, budget: int | None, needs: Needs, component: str = "") -> str:
    part = f" ({component})" if component else ""
    have = "the free GPU memory" if budget is None else f"a {budget / GiB:.1f} GiB budget"
    return f"{what} needs about {need / GiB:.1f} GiB{part}, more than {have}"


def suggest(needs: Needs, free: int, *, fp8: bool) -> str:
    """Flags that would fit `free` bytes, for the one-line out-of-memory error."""
    budget = max(int(free), 0)
    flags = []
    for mode in ("model", "layer"):
        try:
            plan = plan_memory(needs, budget=budget, mode=mode)
        except PlanError:
            continue
        flags.append(f"--offload {mode}")
        if plan.vae_tiling:
            flags.append("--tiled-vae")
        break
    if not flags:
        flags.append("--offload layer with a smaller --width/--height")
    if not fp8:
        flags.append("--fp8 weights")
    return f"try: {' '.join(flags)} --vram-budget {budget / GiB:.0f}"


# -- training -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainNeeds:
    """What one LoRA training step needs on the device, per micro-batch: the frozen denoiser's weights, and per
    block the bytes its backward keeps (`saved`), or only its inputs when checkpointed (`inputs`); `work` is
    the peak of one block's forward or recomputation plus its backward on top of that; `adapters` the trainable
    weights with their gradients and optimizer state."""

    weights: Footprint
    saved: int
    inputs: int
    work: int
    adapters: int


@dataclass
class TrainPlan:
    """Which blocks of the frozen denoiser stream from host memory and which are checkpointed (every streamed
    block is: its weights leave the device after its forward, so its backward must recompute with them back)."""

    budget: int | None
    streamed: tuple[int, ...]
    checkpointed: tuple[int, ...]
    peak: int
    blocks: int
    notes: list[str] = field(default_factory=list)

    def describe(self, needs: TrainNeeds) -> list[str]:
        """Lines for --verbose."""
        budget = "none" if self.budget is None else f"{self.budget / GiB:.1f} GiB"
        fp = needs.weights
        lines = [f"training memory plan: VRAM budget {budget}, expected peak {self.peak / GiB:.1f} GiB",
                 f"  frozen weights: {fp.weights / GiB:.1f} GiB in {self.blocks} blocks"]
        if self.streamed:
            lines.append(f"  {self.blocks - len(self.streamed)} blocks resident, {len(self.streamed)} streamed "
                         f"from host memory ({sum(fp.blocks[i] for i in self.streamed) / GiB:.1f} GiB, copied "
                         "twice a step: forward and recomputation)")
        else:
            lines.append("  every block resident")
        lines.append(f"  gradient checkpointing: {len(self.checkpointed)} of {self.blocks} blocks")
        lines.append(f"  adapters, gradients, optimizer state: {needs.adapters / GiB:.2f} GiB")
        lines += [f"  note: {n}" for n in self.notes]
        return lines


def _train_peak(needs: TrainNeeds, streamed: Sequence[int], checkpointed: int) -> int:
    fp = needs.weights
    n = len(fp.blocks)
    return (_resident_bytes(fp, tuple(streamed)) + needs.adapters + needs.work
            + checkpointed * needs.inputs + (n - checkpointed) * needs.saved)


def plan_training(needs: TrainNeeds, *, budget: int | None, checkpointing: bool | None = None) -> TrainPlan:
    """Fit a training step under `budget` bytes (None: no limit): keep every block resident and un-checkpointed
    if that fits; else checkpoint as few blocks as fit (evenly spread), then every block; else stream blocks
    from host memory too, as few as fit. checkpointing True checkpoints every block, False none (then nothing
    may stream either); None lets the budget choose."""
    fp = needs.weights
    n = len(fp.blocks)
    room = None if budget is None else budget - HEADROOM

    def fits(nbytes: int) -> bool:
        return room is None or nbytes <= room

    def plan(streamed: Sequence[int], checkpointed: Sequence[int], notes: Sequence[str] = ()) -> TrainPlan:
        return TrainPlan(budget, tuple(streamed), tuple(sorted(checkpointed)),
                         _train_peak(needs, streamed, len(checkpointed)), n, list(notes))

    every = tuple(range(n))
    if checkpointing is False:
        peak = _train_peak(needs, (), 0)
        if not fits(peak):
            raise PlanError(_train_too_small(peak, budget, "without gradient checkpointing")
                            + "; drop --no-checkpointing")
        return plan((), ())
    if checkpointing is None and fits(_train_peak(needs, (), 0)):
        return plan((), ())
    if checkpointing is None and room is not None and needs.saved > needs.inputs:
        # The fewest checkpointed blocks that fit: each one trades its saved activations for its inputs.
        over = _train_peak(needs, (), 0) - room
        count = -(-over // (needs.saved - needs.inputs))
        if count < n:
            return plan((), spread(n, count))
    if fits(_train_peak(needs, (), n)):
        return plan((), every)
    slots = min(SLOTS, n) * fp.block
    spare = (room or 0) - fp.rest - slots - needs.adapters - needs.work - n * needs.inputs
    resident = max(0, min(n, spare // fp.block)) if fp.block else n
    streamed = spread(n, n - resident)
    peak = _train_peak(needs, streamed, n)
    if resident == 0 and not fits(peak):
        raise PlanError(_train_too_small(peak, budget, "with every block streamed"))
    return plan(streamed, every, [f"{len(streamed)} blocks stream from pinned host memory"])


def _train_too_small(need: int, budget: int | None, how: str) -> str:
    have = "the free GPU memory" if budget is None else f"a {budget / GiB:.1f} GiB budget"
    return f"training needs about {(need + HEADROOM) / GiB:.1f} GiB {how}, more than {have}"
