"""Family-free memory glue: byte counts from safetensors headers (before anything loads) for the planner, the
plan for a device, and block-wise loading of a denoiser through an explicit, ordered list of transforms.

Loading a denoiser reads one block at a time (memory-mapped), puts it on the device and runs the transforms
on it in order: FP8 quantisation first, then whatever else a caller adds (LoRA), and last the placement: keep
it on the device (resident plan) or pack it into pinned host memory (offload plans). So neither the host nor
the device ever holds the whole checkpoint in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from qimg.loading.checkpoint import safetensors_files, tensor_headers
from qimg.pipelines.family import BlockLists, Family
from qimg.runtime.devices import cuda_index
from qimg.runtime.fp8 import Predicate, apply_fp8
from qimg.runtime.offload import HostCopy, Offloaded, module_tensors
from qimg.runtime.options import RuntimeOptions
from qimg.runtime.planner import Footprint, GiB, MemoryPlan, Needs, RequestShape, plan_memory

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}

# (qualified block prefix, block) -> None: changes a freshly loaded block in place (quantise it, attach adapters).
BlockTransform = Callable[[str, nn.Module], None]


def footprint(
    headers: dict[str, tuple[str, tuple[int, ...]]],
    block_of: Callable[[str], object | None],
    dtype_bytes: int,
    fp8: Callable[[str], bool] | None,
    act: int,
    skip: Callable[[str], bool] = lambda name: False,
) -> Footprint:
    """Device bytes after loading: floating tensors in the compute dtype, FP8-chosen weights at one byte per
    value plus an fp32 scale per output row. block_of(name) gives a sortable block key (run order) or None."""
    rest, blocks = 0, {}
    for name, (dt, shape) in headers.items():
        if skip(name):
            continue
        numel = 1
        for d in shape:
            numel *= d
        if fp8 is not None and len(shape) == 2 and name.endswith(".weight") and fp8(name.removesuffix(".weight")):
            n = numel + 4 * shape[0]
        else:
            n = numel * (dtype_bytes if dt.startswith(("F", "BF")) else _BYTES.get(dt, 4))
        key = block_of(name)
        if key is None:
            rest += n
        else:
            blocks[key] = blocks.get(key, 0) + n
    return Footprint(rest, tuple(blocks[k] for k in sorted(blocks)), act)  # type: ignore[type-var]


def denoiser_footprint(
    folder: Path, blocks: BlockLists, predicate: Predicate, dtype: torch.dtype, fp8: str | None, act: int
) -> Footprint:
    """A block-structured denoiser's device bytes from its safetensors headers; `act` its activation peak."""
    size = torch.empty(0, dtype=dtype).element_size()
    chosen = None if fp8 is None else (lambda name: predicate(name, None))  # type: ignore[arg-type]
    return footprint(tensor_headers(safetensors_files(folder)), blocks.key, size, chosen, act)


def device_budget(device: torch.device, options: RuntimeOptions) -> int | None:
    """The bytes a plan may fill: the budget given, else on CUDA the memory free right now (plus what this
    process already holds in its cache); None on the CPU (no limit)."""
    if options.budget_bytes is not None:
        return options.budget_bytes
    if device.type == "cuda":
        index = cuda_index(device)
        return torch.cuda.mem_get_info(index)[0] + torch.cuda.memory_reserved(index)
    return None


def make_plan(
    family: Family, root: Path, task: str, device: torch.device, dtype: torch.dtype, options: RuntimeOptions,
    shape: RequestShape, *, keep: MemoryPlan | None = None,
) -> tuple[MemoryPlan, Needs]:
    """The plan for one request shape on `device` (on the CPU everything is resident). keep: re-plan within an
    earlier plan's offload mode and budget (a request of another shape on a loaded pipeline)."""
    needs = family.needs(root, dtype, options.fp8, task, shape)
    budget = keep.budget if keep is not None else device_budget(device, options)
    mode = keep.mode if keep is not None else options.offload
    if device.type != "cuda":
        mode = "none"
    plan = plan_memory(needs, budget=budget, mode=mode, text_encoder_device=options.text_encoder_device,
                       vae_tiling=options.vae_tiling is not None)
    return plan, needs


def cap_process_memory(device: torch.device, options: RuntimeOptions) -> None:
    """Hold this process to the VRAM budget, so a plan that is off by a little fails here, not the machine."""
    if options.vram_budget is None or device.type != "cuda":
        return
    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, options.vram_budget * GiB / total), index)


def fp8_transform(predicate: Predicate, mode: str) -> BlockTransform:
    """Quantise the linears of a block that the predicate selects (names are qualified by the block prefix)."""

    def transform(prefix: str, block: nn.Module) -> None:
        apply_fp8(block, lambda name, lin: predicate(f"{prefix}.{name}", lin), compute=mode == "compute")

    return transform


def load_denoiser(
    family: Family,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    plan: MemoryPlan,
    *,
    fp8: str | None = None,
    transforms: Sequence[BlockTransform] = (),
) -> tuple[nn.Module, Offloaded | None]:
    """The family's denoiser, loaded block by block. Each block runs, in this order: FP8 quantisation (when
    asked), the caller's `transforms`, then placement: kept on the device under a resident plan, else packed
    into pinned host memory and handed to an Offloaded that streams the blocks the plan says."""
    keep = plan.mode == "none"
    blocks = family.denoiser_blocks
    steps = ([fp8_transform(family.denoiser_fp8, fp8)] if fp8 is not None else []) + list(transforms)
    packed: dict[str, HostCopy] = {}

    def on_block(prefix: str, model: nn.Module) -> None:
        block = model.get_submodule(prefix)
        for step in steps:
            step(prefix, block)
        if not keep:
            packed[prefix] = HostCopy(module_tensors(block))

    model = family.load_denoiser(folder, device=device, dtype=dtype, group=blocks.prefix, on_group=on_block)
    if keep:
        return model, None
    copies = {blocks.index(model, prefix): copy for prefix, copy in packed.items()}
    offloaded = Offloaded(model, device, blocks.modules(model), block_copies=copies)
    offloaded.stream(plan.streamed.get("transformer", ()))
    return model, offloaded
