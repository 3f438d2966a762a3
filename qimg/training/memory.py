"""Where a training run's frozen denoiser lives: the training memory plan for a dataset under a VRAM budget
(runtime/planner.plan_training over the family's byte counts), and its placement once loaded: checkpointed
blocks, blocks streamed from pinned host memory through forward and backward (runtime/offload.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from qimg.errors import GPUMemoryError, UsageError
from qimg.loading.hub import ModelRef
from qimg.pipelines.base import resolve_device
from qimg.pipelines.family import Family
from qimg.pipelines.memory import device_budget, stored_fp8_mode
from qimg.runtime.checkpoint import checkpoint_blocks
from qimg.runtime.compile import compile_inside
from qimg.runtime.offload import Offloaded
from qimg.runtime.options import RuntimeOptions
from qimg.runtime.planner import PlanError, TrainNeeds, TrainPlan, plan_training
from qimg.training.config import TrainConfig
from qimg.training.data import TrainItem, bucket_for
from qimg.training.sharding import check_sharded_plan, sharded_needs

VL_PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: 14-pixel patches merged 2x2 into one text-stream token
TEXT_TOKENS = 512  # the longest prompt a text-to-image model reads (max_sequence_length)


def target_modules(family: Family, linears: Mapping[str, Any], targets: str) -> list[str]:
    """The linears of the denoiser's blocks that --targets trains, in the order given."""
    out = []
    for name in linears:
        prefix = family.denoiser_blocks.prefix(name + ".")
        if prefix is not None and name[len(prefix) + 1:] in family.train_targets[targets]:
            out.append(name)
    return out


def step_tokens(ref: ModelRef, config: TrainConfig, items: Sequence[TrainItem]) -> int:
    """An upper bound on the tokens of one row of the largest step: its image, its controls (each at about the
    spec's VAE area), and its prompt (edit models: with the controls' vision tokens)."""
    spec = ref.spec
    size = max((bucket_for(i.width, i.height, max_pixels=config.max_pixels) for i in items),
               key=lambda s: s[0] * s[1])
    controls = max((len(i.controls) for i in items), default=0)
    # A control's VAE area: the spec's, or (FLUX.1-Kontext) its largest training resolution.
    control_area = spec.vae_image_area or max((w * h for w, h in spec.input_sizes), default=0)
    return (size[0] * size[1] // 256 + controls * control_area // 256 + TEXT_TOKENS
            + controls * spec.vl_image_area // VL_PIXELS_PER_TOKEN)


def training_plan(ref: ModelRef, family: Family, config: TrainConfig, options: RuntimeOptions,
                  items: Sequence[TrainItem], *, shards: int = 1) -> tuple[TrainPlan, TrainNeeds]:
    """The training memory plan for this dataset on the device the options name (no limit on the CPU); a step
    that fits no placement is a GPUMemoryError saying what would help. shards: the frozen base sharded over that
    many ranks (training/sharding.py), which then must fit without streaming blocks."""
    if family.train_needs is None:
        raise UsageError(f"{ref.name} ({family.name}) cannot be trained by qimg train-lora yet")
    device, dtype = resolve_device(options)
    linears = family.denoiser_linears(ref.path / family.denoiser_folder)
    values = sum(config.rank * (linears[n][0] + linears[n][1])
                 for n in target_modules(family, linears, config.targets))
    weights = None
    if ref.transformer is not None:
        from qimg.loading.single_file import read_transformer_file

        weights = read_transformer_file(ref.transformer, family.name)
    fp8 = stored_fp8_mode(options.fp8, weights)
    if shards > 1 and fp8 is not None:
        raise UsageError("--shard-base cannot shard FP8 weights: FP8 linears hold them as buffers, which FSDP "
                         "leaves whole on every rank", hint="shard a bf16 model (no --fp8), or use --no-shard-base")
    needs = family.train_needs(ref.path, dtype, fp8, step_tokens(ref, config, items), config.batch_size, values,
                               weights=weights)
    if shards > 1:
        needs = sharded_needs(needs, shards)
    notes = []
    if fp8 == "weights" and options.compile:
        # Compiled, an FP8 linear's upcast weight is kept for backward instead of upcast again (the compiler's
        # choice; bench/results/train_compile_fp8_h200.json: +25 GiB over 60 blocks): plan for it in every
        # block that is not checkpointed (bounded by the block's bf16 size).
        needs = dataclasses.replace(needs, saved=needs.saved + 2 * needs.weights.block)
        notes.append("compiled FP8 linears keep their upcast weights for backward: planned as saved activations")
    budget = device_budget(device, options)
    try:
        plan = plan_training(needs, budget=budget, checkpointing=config.checkpointing)
        if shards > 1:
            check_sharded_plan(plan, shards)
            notes.append(f"the frozen weights are sharded over {shards} processes (sizes above: one process's "
                         "share)")
        plan.notes += notes
        return plan, needs
    except PlanError as e:
        hint = "try --fp8 weights, a lower --resolution" + (", or a larger --vram-budget"
                                                           if options.vram_budget is not None else "")
        raise GPUMemoryError(str(e), hint=hint) from None


def place_for_training(pipe: Any, plan: TrainPlan) -> None:
    """Put the loaded denoiser where the plan says, for training: its checkpointed blocks wrapped, its resident
    part on the device, its streamed blocks cycling through device slots from pinned host memory in forward
    and in backward. Sample images made during the run use the same placement."""
    model = pipe.transformer
    blocks = pipe.family.denoiser_blocks.modules(model)
    checkpoint_blocks(blocks[i] for i in plan.checkpointed)
    if pipe.options.compile:
        # Inside the checkpoint and the streaming wrapper (which binds weights, so it must stay eager): the
        # checkpoint then really recomputes, and its memory is what the plan counted.
        compile_inside(blocks)
    pipe.phase("denoise")
    if plan.streamed:
        offloaded = pipe.transformer_offload
        if offloaded is None:  # loaded resident (the CPU, or a plan without a budget): pack it now
            offloaded = Offloaded(model, pipe.torch_device, blocks)
            pipe.transformer_offload = offloaded
        offloaded.stream(plan.streamed, backward=True)
        offloaded.to_device()
    pipe.placement_fixed = True
