"""NCCL all-to-all time between the GPUs of one machine at the sizes Ulysses sequence parallelism sends per
attention call (issue 16): is a step's cost in the bytes exchanged or in the count of exchanges?

    NCCL_DEBUG=INFO torchrun --standalone --nproc-per-node 2 bench/nccl_all_to_all.py

Rank 0 prints, per size, the mean of 50 calls after 5 warm-up calls; NCCL_DEBUG=INFO shows the transport chosen
(P2P/CUMEM over NVLink, SHM, ...).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("nccl")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    for mib in (1, 6.5, 26, 104):  # 26 MiB: one of q, k, v of a 1024x1024 Qwen-Image forward on 2 ranks
        x = torch.randn(int(mib * 2**20 / 2), dtype=torch.bfloat16, device="cuda")
        y = torch.empty_like(x)
        for _ in range(5):
            dist.all_to_all_single(y, x)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(50):
            dist.all_to_all_single(y, x)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / 50
        if rank == 0:
            sent = mib / 1024 * (size - 1) / size  # GiB leaving each rank (its own share stays)
            print(f"all_to_all {mib} MiB per rank: {seconds * 1e3:.3f} ms, {sent / seconds:.1f} GiB/s out per rank",
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
