"""Several processes of one job, started by torchrun (torch.distributed.run), which also does the multi-node
rendezvous: which process this is, the process group, and the shared work queue of a prompt-file batch.

qimg has no launcher or cluster code of its own: `torchrun --nproc-per-node N -m qimg generate --prompts ...` (or
`qimg generate --gpus N`, which starts exactly that) runs one qimg per GPU; each finds its rank in the environment
torchrun sets. Coordination is small and goes through torchrun's own key-value store and the gloo backend, so it
is the same on GPUs and on the CPU (where the tests run it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job."""

    rank: int
    size: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def world_from_env(environ: Mapping[str, str] | None = None) -> World | None:
    """The torchrun job this process belongs to (RANK, WORLD_SIZE, LOCAL_RANK), or None outside one or in a world
    of one process (which then runs as a plain process)."""
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        return None
    if size <= 1:
        return None
    return World(rank, size, local)


def local_device(world: World, requested: str | None) -> str | None:
    """The device this rank runs on: its own GPU (cuda:LOCAL_RANK) when the user asked for "cuda" or for nothing
    and GPUs are present; an explicit cuda:N or cpu is kept (every rank then uses it)."""
    if requested in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{world.local_rank % torch.cuda.device_count()}"
    return requested


def init_world(world: World, timeout_s: float = 1800.0) -> None:
    """Join the job's process group: gloo for what happens on the host (a batch's work queue), and NCCL for
    CUDA tensors (one image over several GPUs) where GPUs are present. The timeout bounds a wait on a rank that
    died; torchrun normally stops the others first."""
    if dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=timedelta(seconds=timeout_s))


def leave_world() -> None:
    """Leave the process group in step with the other ranks: a barrier (every rank is done with every
    collective), then the group's teardown. A rank that tears its group down while another still exchanges with
    it, or one that leaves it to interpreter exit, can abort a process after the work is done ("terminate called
    without an active exception", seen once in CI). Call it on the way out of a run that went well; after an
    error the other ranks may never reach the barrier, and torchrun stops them."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class BatchShard:
    """One prompt-file batch shared by every rank: items are claimed one at a time from a counter in torchrun's
    store, so faster ranks take more (lines differ in size and steps) and each item runs exactly once. The leader
    (rank 0) alone locks the folder, cleans it and reports the totals."""

    def __init__(self, world: World) -> None:
        init_world(world)
        self.world = world
        nonce = [uuid.uuid4().hex if world.leader else ""]
        dist.broadcast_object_list(nonce, src=0)  # keys of this run only, whatever an earlier run left in the store
        self.prefix = f"qimg/batch/{nonce[0]}/"
        # torchrun's rendezvous store, which init_process_group connected to; no public accessor exists
        self.store = dist.distributed_c10d._get_default_store()

    @property
    def leader(self) -> bool:
        return self.world.leader

    def barrier(self) -> None:
        dist.barrier()

    def next_item(self, count: int) -> int | None:
        """The next unclaimed index below `count`, or None when all are claimed or the batch was stopped."""
        if self.store.check([self.prefix + "stop"]):
            return None
        index = int(self.store.add(self.prefix + "next", 1)) - 1
        return index if index < count else None

    def stop(self) -> None:
        """No rank claims another item (--fail-fast after a failure)."""
        self.store.set(self.prefix + "stop", "1")

    def totals(self, counts: Mapping[str, int]) -> dict[str, int]:
        """Every rank's counts summed; a collective: all ranks call it once, at the end."""
        gathered: list[dict[str, int] | None] = [None] * self.world.size
        dist.all_gather_object(gathered, dict(counts))
        return {key: sum((g or {}).get(key, 0) for g in gathered) for key in counts}

    def close(self) -> None:
        leave_world()
