"""Family-free memory glue: byte counts from safetensors headers (before anything loads) for the planner, the
plan for a device, block-wise loading of a denoiser through an explicit, ordered list of transforms, and the
one-line errors (with the flags that fit) when memory runs out.

Loading a denoiser reads one block at a time (memory-mapped), puts it on the device and runs the transforms
on it in order: FP8 quantisation first, then whatever else a caller adds (LoRA), and last the placement: keep
it on the device (resident plan) or pack it into pinned host memory (offload plans). So neither the host nor
the device ever holds the whole checkpoint in the compute dtype.

A single-file transformer (loading/single_file.py) loads the same way; the FP8 weights it stores become FP8
linears as they are (their scale broadcast per row), before anything else runs on the block.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qimg.errors import GPUMemoryError
from qimg.loading.checkpoint import GroupFill, meta_device, safetensors_files, tensor_headers
from qimg.loading.single_file import TransformerFile, read_transformer_file
from qimg.pipelines.family import BlockLists, Family
from qimg.runtime.devices import cuda_index
from qimg.runtime.fp8 import FP8Linear, Predicate, apply_fp8
from qimg.runtime.host_copies import FileBlock, HostCopy, module_tensors
from qimg.runtime.merge import Delta, merge_deltas
from qimg.runtime.offload import Offloaded
from qimg.runtime.options import RuntimeOptions
from qimg.runtime.planner import Footprint, GiB, MemoryPlan, Needs, RequestShape, TrainNeeds, plan_memory, suggest

if TYPE_CHECKING:
    from qimg.loading.hub import ModelRef

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
    folder: Path, blocks: BlockLists, predicate: Predicate, dtype: torch.dtype, fp8: str | None, act: int,
    *, weights: TransformerFile | None = None,
) -> Footprint:
    """A block-structured denoiser's device bytes from its safetensors headers (those of `weights`, a single
    file, when given: its FP8-stored linears stay FP8 with or without `fp8`); `act` its activation peak."""
    size = torch.empty(0, dtype=dtype).element_size()

    def quantisable(name: str) -> bool:
        return predicate(name, None)  # type: ignore[arg-type]

    if weights is None:
        chosen = None if fp8 is None else quantisable
        return footprint(tensor_headers(safetensors_files(folder)), blocks.key, size, chosen, act)
    kept = weights.kept_fp8()
    return footprint(weights.tensors, blocks.key, size,
                     lambda name: name in kept or (fp8 is not None and quantisable(name)), act)


# Bytes one block keeps for its backward, in hidden-state copies (B x tokens x dim in the compute dtype): bench/
# train.py's un-checkpointed step on the full model at 1024x1024 peaked 33.3 GiB over the weights for 60 blocks of
# 4224 tokens, 23 copies each with the adapters' gradients and optimizer state counted in; 22 without them.
TRAIN_SAVED_COPIES = 22


def block_train_needs(weights: Footprint, dim: int, size: int, tokens: int, batch: int, adapter_params: int,
                      saved_copies: int = TRAIN_SAVED_COPIES) -> TrainNeeds:
    """What a LoRA training step needs from the denoiser's footprint (its act: the inference working set of one
    block), the hidden width, the compute dtype's bytes, `batch` rows of `tokens` tokens, and the trainable
    values (fp32, with a gradient and AdamW's two moments: 16 bytes each). saved_copies: the hidden-state copies
    one block keeps for its backward, as measured for the family (Qwen-Image's by default)."""
    copy = batch * tokens * dim * size
    saved = saved_copies * copy
    return TrainNeeds(weights=weights, saved=saved, inputs=copy, work=saved + weights.act,
                      adapters=16 * adapter_params)


def stored_fp8_mode(fp8: str | None, weights: TransformerFile | None) -> str | None:
    """The FP8 mode the denoiser runs in: the one asked for, else "weights" when a single file stores linears
    in FP8 (they load as FP8 storage either way), else None."""
    if fp8 is not None or weights is None:
        return fp8
    return "weights" if weights.kept_fp8() else None


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
    shape: RequestShape, *, keep: MemoryPlan | None = None, weights: TransformerFile | None = None,
) -> tuple[MemoryPlan, Needs]:
    """The plan for one request shape on `device` (on the CPU everything is resident). keep: re-plan within an
    earlier plan's offload mode and budget (a request of another shape on a loaded pipeline). weights: a
    single-file transformer in place of the folder's."""
    needs = family.needs(root, dtype, options.fp8, task, shape, weights=weights)
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


def fp8_linear_from_stored(weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                           dtype: torch.dtype, compute: bool) -> FP8Linear:
    """An FP8Linear holding stored e4m3 values (N, K) as they are, with their scale (one number, or one per
    output row; None: 1) broadcast to its per-row (1, N) fp32 scale: never dequantised and quantised again."""
    n, k = weight.shape
    with meta_device():  # the constructor quantises the shell's weight: on meta that reads no data
        linear = FP8Linear(nn.Linear(k, n, bias=False, dtype=dtype), compute)
    scale = torch.ones(1) if scale is None else scale.float().reshape(-1)
    linear.weight_fp8 = weight.detach()
    linear.weight_scale = scale.to(weight.device).expand(n).reshape(1, n).contiguous()
    linear.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def stored_fp8_transform(weights: TransformerFile, dtype: torch.dtype, mode: str | None, predicate: Predicate
                         ) -> BlockTransform:
    """Turn the linears a single file loaded with e4m3 weights into FP8 linears: FP8 matmuls under --fp8 compute
    for the linears the family's predicate allows, storage (upcast per use) for the rest and otherwise."""

    def transform(prefix: str, block: nn.Module) -> None:
        for name, linear in list(block.named_modules()):
            if not isinstance(linear, nn.Linear) or linear.weight.dtype != torch.float8_e4m3fn:
                continue
            qualified = f"{prefix}.{name}" if prefix else name
            scale = weights.scale(f"{qualified}.weight")
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            compute = mode == "compute" and predicate(qualified, None)  # type: ignore[arg-type]
            setattr(parent, child, fp8_linear_from_stored(linear.weight, scale, linear.bias, dtype, compute))

    return transform


def merge_transform(merge: Mapping[str, Sequence[tuple[Delta, float]]], merged: set[str]) -> BlockTransform:
    """Add LoRA deltas into a block's linears as it loads (names are qualified by the block prefix); the names
    done go into `merged`."""

    def transform(prefix: str, block: nn.Module) -> None:
        lead = f"{prefix}."
        wanted = {name: deltas for name, deltas in merge.items() if name.startswith(lead)}
        if wanted:
            merged.update(merge_deltas(block, wanted, prefix))

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
    weights: TransformerFile | None = None,
    merge: Mapping[str, Sequence[tuple[Delta, float]]] | None = None,
) -> tuple[nn.Module, Offloaded | None]:
    """The family's denoiser, loaded block by block (from `weights`, a single file, when given). Each block
    runs, in this order: the file's FP8 weights made FP8 linears, the LoRA deltas of `merge` added into the bf16
    weights (module name -> [(delta, strength)]: runtime/merge.py), FP8 quantisation (when asked: so FP8 is
    quantised from bf16 + delta), the caller's `transforms`, then placement: kept on the device under a resident
    plan, else packed into pinned host memory and handed to an Offloaded that streams the blocks the plan says.

    Under a plan that streams, no block is read here: each becomes a FileBlock, read (and run through the same
    steps) when the denoiser first comes to the device, so the prompts can be encoded before it takes any host
    memory; the blocks the plan keeps resident then never get a host copy (re-read when they come back)."""
    keep = plan.mode == "none"
    blocks = family.denoiser_blocks
    stored = [] if weights is None else [stored_fp8_transform(weights, dtype, fp8, family.denoiser_fp8)]
    merged: set[str] = set()
    merging = [] if not merge else [merge_transform(merge, merged)]
    steps = (stored + merging + ([fp8_transform(family.denoiser_fp8, fp8)] if fp8 is not None else [])
             + list(transforms))
    packed: dict[str, HostCopy] = {}
    files: dict[str, FileBlock] = {}
    lazy = not keep and bool(plan.streamed.get("transformer"))

    def on_block(prefix: str, model: nn.Module) -> None:
        block = model.get_submodule(prefix)
        for step in steps:
            step(prefix, block)
        if not keep:
            packed[prefix] = HostCopy(module_tensors(block))

    def on_later(prefix: str, model: nn.Module, fill: GroupFill) -> None:
        block = model.get_submodule(prefix)  # still as built, on the meta device: a template costs nothing

        def load(module: nn.Module) -> None:
            fill(module, device)
            for step in steps:
                step(prefix, module)

        files[prefix] = FileBlock(load, copy.deepcopy(block))
        if merging:  # LoRA targets in this block are checked now, on a throwaway copy, not at its first read
            merging[0](prefix, copy.deepcopy(block))

    source: dict[str, Any] = {} if weights is None else {"weights": weights}
    if lazy:
        source.update(later=lambda prefix: True, on_later=on_later)
    model = family.load_denoiser(folder, device=device, dtype=dtype, group=blocks.prefix, on_group=on_block, **source)
    for step in stored:  # FP8 linears outside the blocks (none for families that keep those in bf16)
        step("", model)
    if merge:  # LoRA targets outside the blocks (input and output projections, embeddings), before any packing
        rest = {name: deltas for name, deltas in merge.items() if name not in merged}
        merged.update(merge_deltas(model, rest))
        missing = sorted(set(merge) - merged)
        if missing:
            raise ValueError(f"LoRA targets {', '.join(missing[:3])} are not linears of the loaded denoiser")
    if keep:
        return model, None
    copies = {blocks.index(model, prefix): packed_copy for prefix, packed_copy in packed.items()}
    on_demand = {blocks.index(model, prefix): file for prefix, file in files.items()}
    offloaded = Offloaded(model, device, blocks.modules(model), block_copies=copies, files=on_demand)
    offloaded.stream(plan.streamed.get("transformer", ()))
    return model, offloaded


def fitting_flags(fp8: str | None) -> str:
    """The flags that make a plan smaller, for an error's hint."""
    hints = ["a larger --vram-budget", "--offload layer"]
    if fp8 is None:
        hints.insert(0, "--fp8 weights")
    return "try " + ", ".join(hints) + " or a smaller --width/--height"


def out_of_memory(family: Family, ref: ModelRef, device: torch.device, dtype: torch.dtype, fp8: str | None
                  ) -> GPUMemoryError:
    """The one-line error for a CUDA out-of-memory: the flags the planner says fit this GPU's memory."""
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(cuda_index(device))
    try:
        weights = None if ref.transformer is None else read_transformer_file(ref.transformer, family.name)
        needs = family.needs(ref.path, dtype, fp8 or "weights", ref.spec.task, RequestShape(), weights=weights)
        hint = suggest(needs, free, fp8=fp8 is not None)
    except Exception:  # the hint is a courtesy; never let it hide the real error
        hint = "try --offload layer --fp8 weights, --tiled-vae, or a smaller --width/--height"
    return GPUMemoryError(f"the GPU ran out of memory ({free / GiB:.1f} GiB free on {device})", hint=hint)
