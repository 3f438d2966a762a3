"""The frozen denoiser sharded over the ranks of a torchrun job with FSDP2 (torch.distributed.fsdp.fully_shard),
for a base that does not fit one GPU whole: each rank keeps 1/N of every block, gathers a block whole for its
forward and again for its backward (its frozen linears pass the gradient down to the blocks below), then frees it.

Only the frozen base is sharded. The LoRA adapters stay whole on every rank (FSDP is told to ignore them): with
their gradients and AdamW state they are a few hundred MiB at the usual ranks, and whole they keep the rest of
data-parallel training as it is: their gradients are summed over the ranks in the trainer's one all-reduce (a
parameter no rank reached keeps no gradient, as in one process, so AdamW's weight decay leaves it alone), they are
clipped and stepped as plain tensors, and saved and resumed in the one-process format, so a run moves between
process counts freely. The base makes no gradients, so FSDP has nothing to reduce-scatter.

Every sharded forward is a collective, so every rank runs the same passes in the same order: the trainer gives
each rank grad_accum / N micro-batches (grad_accum must be a multiple of N), and every rank makes the sample
images (rank 0 alone writes them).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from qimg.errors import GPUMemoryError, UsageError
from qimg.runtime.planner import Footprint, TrainNeeds, TrainPlan
from qimg.training.config import TrainConfig


def sharded_needs(needs: TrainNeeds, ranks: int) -> TrainNeeds:
    """What a step needs on each of `ranks` devices with the base sharded: 1/N of every block; the weights outside
    the blocks whole as well as sharded (the root keeps them gathered through a step); and two blocks whole at a
    time (the one running and the next, gathered ahead)."""
    fp = needs.weights

    def share(n: int) -> int:
        return -(-n // ranks)

    weights = Footprint(rest=fp.rest + share(fp.rest), blocks=tuple(share(b) for b in fp.blocks), act=fp.act)
    return dataclasses.replace(needs, weights=weights, work=needs.work + 2 * fp.block)


def plan_sharding(config: TrainConfig, ranks: int | None,
                  plan_for: Callable[[int], tuple[TrainPlan, TrainNeeds]]) -> tuple[TrainPlan, TrainNeeds, bool]:
    """The training memory plan and whether the base is sharded, as config.shard_base asks: True shards (under
    torchrun only), False never, None when the plan for a whole base would stream blocks from host memory and
    the sharded one needs none (else it streams, with a note saying why). ranks: the job's process count (None:
    one process); plan_for(n): the plan with the base in n shards (n = 1: whole)."""
    if ranks is None:
        if config.shard_base:
            raise UsageError("--shard-base shards the model over the processes of a torchrun job; this is one "
                             "process", hint="run torchrun --nproc-per-node N -m qimg train-lora ..., or drop "
                                             "--shard-base")
        return (*plan_for(1), False)
    if config.shard_base is False:
        return (*plan_for(1), False)
    uneven = config.grad_accum % ranks != 0
    if config.shard_base:
        if uneven:
            raise UsageError(f"--shard-base needs --grad-accum to be a multiple of the {ranks} processes (got "
                             f"{config.grad_accum}): every rank runs the same passes",
                             hint=f"use --grad-accum {ranks * -(-config.grad_accum // ranks)}, or --no-shard-base")
        return (*plan_for(ranks), True)
    plan, needs = plan_for(1)
    if not plan.streamed:
        return plan, needs, False
    why = f"--grad-accum {config.grad_accum} is not a multiple of {ranks} processes" if uneven else ""
    if not why:
        try:
            return (*plan_for(ranks), True)
        except (UsageError, GPUMemoryError) as e:
            why = str(e)
    plan.notes.append(f"the base is not sharded ({why})")
    return plan, needs, False


def check_sharded_plan(plan: TrainPlan, ranks: int) -> None:
    """A sharded base cannot also stream blocks (FSDP owns the weights' placement)."""
    if plan.streamed:
        raise GPUMemoryError(f"sharded over {ranks} processes, the frozen model still does not fit the GPU without "
                             "streaming blocks from host memory",
                             hint="use more GPUs, a lower --resolution, or --no-shard-base (blocks then stream)")


def shard_denoiser(model: nn.Module, blocks: Sequence[nn.Module], whole: Iterable[nn.Parameter],
                   device: torch.device) -> None:
    """Shard the denoiser's weights over the job's ranks: each block as one FSDP unit (gathered for its forward,
    freed after, gathered again in backward), then the root for the weights outside the blocks. `whole`: the
    parameters every rank keeps whole (the adapters). Weights still in host memory move to `device` a block at a
    time as they are sharded, so no rank ever holds the whole base."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP warns on every step that the denoiser returns a view (its output linear's): an in-place op on it would
    # skip FSDP's backward hook. The losses read it out of place (a slice, .float()), and sampling has no backward.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = set(whole)
    for i, block in enumerate(blocks):
        # The last block's backward comes right after its forward: gathering it again would only cost time.
        fully_shard(block, mesh=mesh, ignored_params=ignored, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, ignored_params=ignored)


def release_offload(pipe: Any) -> None:
    """Take the denoiser out of block offloading (it was loaded into host memory, whole or in part): every weight
    is then a plain host (or device) tensor that sharding moves to the device a block at a time."""
    offloaded = pipe.transformer_offload
    if offloaded is None:
        return
    if pipe.residency is not None:
        pipe.residency.drop("transformer")
    offloaded.off_device()
    pipe.transformer_offload = None
