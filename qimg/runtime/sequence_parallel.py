"""One image on several processes (torchrun ranks): sequence parallelism (Ulysses: Jacobs et al. 2023,
"DeepSpeed Ulysses") and CFG parallelism for the image transformers, applied from outside the nets.

Sequence parallel: each rank of a group keeps 1/N of the tokens (text and image alike, so the split needs no
special case for joint attention) through every per-token layer; at the engine's one attention call site an
all-to-all trades the token split for a head split (each rank then sees every token for H/N heads), attention
runs, and a second all-to-all trades back. Keys arrive ordered by rank ([text_0, image_0, text_1, ...]), which
attention does not mind: positions are already in q and k through RoPE, and each query's output goes back to
the rank and place it came from. CFG parallel: the two branches of a CFG step on two ranks, their velocities
exchanged once per step.

Communication goes through torch.distributed (NCCL on GPUs, gloo on the CPU, where the tests run it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from qimg.errors import InputError
from qimg.nets import layers

Group = dist.ProcessGroup | None  # None: the default (world) group


def token_slice(length: int, rank: int, size: int) -> slice:
    """Rank `rank`'s share of `length` tokens: contiguous, the first length % size ranks one token more."""
    base, extra = divmod(length, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _sizes(length: int, size: int) -> list[int]:
    return [token_slice(length, r, size).stop - token_slice(length, r, size).start for r in range(size)]


def _rank_size(group: Group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def group_size(group: Group) -> int:
    """How many ranks share the tokens (or the branches) in `group`."""
    return dist.get_world_size(group)


def _pg(group: Group) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group  # type: ignore[return-value]


# The functional collectives' ops, called directly and each waited at once: the same calls in eager and inside
# torch.compile'd blocks. Not through torch.distributed._functional_collectives: its eager results are
# AsyncCollectiveTensors, after which (torch 2.13, gloo) the process group outlives destroy_process_group in C++,
# and its worker threads now and then abort the process at exit ("terminate called without an active exception").
_c10d = torch.ops._c10d_functional


def _all_gather(x: Tensor, group: Group) -> Tensor:
    """Every rank's x stacked along dim 0."""
    pg = _pg(group)
    return _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), group_size(group), pg.group_name))


def _all_to_all(x: Tensor, out_sizes: list[int], in_sizes: list[int], group: Group) -> Tensor:
    """Rows of x split by in_sizes, block j to rank j; back come out_sizes[j] rows from rank j, in rank order."""
    return _c10d.wait_tensor(_c10d.all_to_all_single(x, out_sizes, in_sizes, _pg(group).group_name))


def gather_tokens(local: Tensor, lengths: Sequence[int], group: Group = None) -> Tensor:
    """Every rank's (B, L_r, ...) share joined along dim 1 in rank order, on every rank (shares may differ in
    length: padded to the longest for the collective, then cut). Functional collectives throughout, so the
    sequence-parallel path also runs inside torch.compile'd blocks."""
    longest = max(lengths)
    padded = F.pad(local, (0, 0) * (local.dim() - 2) + (0, longest - local.shape[1]))
    parts = _all_gather(padded, group).chunk(len(lengths))  # (size * B, ...)
    return torch.cat([p[:, :n] for p, n in zip(parts, lengths, strict=True)], dim=1)


def _ulysses(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, inner: layers.AttentionFn, group: Group,
             lengths: Sequence[int]) -> Tensor:
    """Attention over the whole sequence from each rank's share of it: (B, L_r, H, D) in, (B, L_r, H * D) out.
    lengths: every rank's share (known to the caller, so no exchange or device sync per call)."""
    rank, size = _rank_size(group)
    b, local, heads, d = q.shape
    if heads % size:
        raise ValueError(f"sequence parallelism over {size} ranks needs a head count divisible by it ({heads})")
    if lengths[rank] != local:
        raise ValueError(f"rank {rank} holds {local} tokens where its share is {lengths[rank]}")
    total, h = sum(lengths), heads // size
    # q, k and v travel in one exchange, not three: each all-to-all is a synchronisation point between the ranks,
    # and on NVLink their count, not their bytes, is what the measured steps pay for (bench/multi_gpu.py, part s).
    # (B, L_r, H, D) each -> (N, L_r, B, 3, H/N, D): block j goes to rank j; back come every rank's tokens for our
    # heads.
    send = torch.stack([x.reshape(b, local, size, h, d).permute(2, 1, 0, 3, 4) for x in (q, k, v)], dim=3)
    recv = _all_to_all(send.reshape(size * local, -1), list(lengths), [local] * size, group)
    # (B, L, H/N, D) each, tokens in rank order; dense, as the kernels get them without sequence parallelism
    qh, kh, vh = (t.transpose(0, 1).contiguous() for t in recv.reshape(total, b, 3, h, d).unbind(2))

    key_mask = None
    if mask is not None:
        key_mask = gather_tokens(mask.to(torch.uint8), lengths, group).bool()
    out = inner(qh, kh, vh, key_mask)  # (B, L, H/N, D)
    send = out.reshape(b, total, h * d).transpose(0, 1).contiguous().reshape(total, -1)
    recv = _all_to_all(send, [local] * size, list(lengths), group)
    # (N head blocks, L_r, B, H/N * D) -> (B, L_r, H * D)
    return recv.reshape(size, local, b, h * d).permute(2, 1, 0, 3).reshape(b, local, heads * d)


@contextmanager
def ulysses_attention(group: Group, lengths: Sequence[int]) -> Iterator[None]:
    """Inside the block, the engine's attention call site (nets.layers.attention) runs sequence-parallel over
    `group`, with whichever kernel was set before (cuDNN, SDPA, ...) on each rank's head share. lengths: each
    rank's token count in every attention call."""
    inner = layers._attention_impl
    previous = layers.set_attention_impl(partial(_ulysses, inner=_heads_out(inner), group=group, lengths=lengths))
    try:
        yield
    finally:
        layers.set_attention_impl(previous)


def _heads_out(inner: layers.AttentionFn) -> layers.AttentionFn:
    # attention kernels return (B, L, H, D); keep that shape for the all-to-all back
    def call(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return inner(q, k, v, mask).reshape(q.shape)

    return call


def sequence_parallel(run: Callable[..., Tensor], img: Tensor, txt: Tensor, rope: Tensor, group: Group = None,
                      **kw: Tensor | int | None) -> Tensor:
    """A transformer call `run(img, txt, rope, **kw)` (tokens on dim 1, rope rows [text, image]) on this rank's
    share of the text and image tokens, inside ulysses_attention; returns the whole image output on every rank.
    A `txt_mask` (B, Lt) in kw is sliced with the text; an `n_target` (the target's image tokens, reference
    tokens after them) becomes this rank's count."""
    rank, size = _rank_size(group)
    lt, li = txt.shape[1], img.shape[1]
    ts, im = token_slice(lt, rank, size), token_slice(li, rank, size)
    local_rope = torch.cat([rope[ts], rope[lt + im.start: lt + im.stop]])
    if kw.get("txt_mask") is not None:
        kw["txt_mask"] = kw["txt_mask"][:, ts]  # type: ignore[index]
    if kw.get("n_target") is not None:
        kw["n_target"] = min(max(int(kw["n_target"]) - im.start, 0), im.stop - im.start)  # type: ignore[arg-type]
    joint = [a + b for a, b in zip(_sizes(lt, size), _sizes(li, size), strict=True)]
    with ulysses_attention(group, joint):
        out = run(img[:, im], txt[:, ts], local_rope, **kw)
    return gather_tokens(out, _sizes(li, size), group)


def cfg_parallel(branch: Callable[[int], Tensor], group: Group = None) -> tuple[Tensor, Tensor]:
    """The two branches of a CFG step on a group of two ranks: rank 0 runs branch(0) (the prompt), rank 1
    branch(1) (the negative); both get (cond, uncond) back to combine as one process would."""
    rank, size = _rank_size(group)
    if size != 2:
        raise ValueError(f"CFG parallelism runs on groups of 2 ranks, not {size}")
    both = _all_gather(branch(rank), group)  # (2 * B, ...)
    cond, uncond = both.chunk(2)
    return cond, uncond


@dataclass(frozen=True)
class ParallelPlan:
    """How this rank takes part in one image: its sequence-parallel group (None: the whole sequence here), its
    CFG group (None: both branches here) and the CFG branch it computes (0: the prompt, 1: the negative)."""

    mode: str
    seq_group: dist.ProcessGroup | None
    cfg_group: dist.ProcessGroup | None
    branch: int


def make_parallel_plan(mode: str) -> ParallelPlan:
    """The groups for `mode` over the initialised world: "seq" (all ranks share the tokens), "cfg" (2 ranks, a
    branch each), "cfg+seq" (an even count >= 4: two halves, a branch each, each half sharing the tokens). Every
    rank must call it, in the same order (new groups are collective)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    if mode == "seq":
        return ParallelPlan(mode, dist.group.WORLD, None, 0)
    if mode == "cfg":
        if size != 2:
            raise ValueError(f"--parallel cfg runs on 2 processes, not {size} (cfg+seq uses 4 or more)")
        return ParallelPlan(mode, None, dist.group.WORLD, rank)
    if mode != "cfg+seq" or size < 4 or size % 2:
        raise ValueError(f"--parallel {mode} on {size} processes: cfg+seq needs an even count of at least 4")
    half = size // 2
    seq = [dist.new_group(list(range(i * half, (i + 1) * half))) for i in range(2)]
    cfg_groups = [dist.new_group([i, i + half]) for i in range(half)]
    return ParallelPlan(mode, seq[rank // half], cfg_groups[rank % half], rank // half)


def on_tokens(parallel: ParallelPlan, run: Callable[..., Tensor], img: Tensor, txt: Tensor, rope: Tensor,
              **kw: Tensor | int | None) -> Tensor:
    """run(img, txt, rope, **kw) as this rank's plan places the tokens: all here, or shared over its sequence
    group (sequence_parallel)."""
    if parallel.seq_group is None:
        return run(img, txt, rope, **kw)
    return sequence_parallel(run, img, txt, rope, parallel.seq_group, **kw)


def cfg_branches(parallel: ParallelPlan, count: int, branch: Callable[[int], Tensor]) -> list[Tensor]:
    """The velocity of each of `count` CFG branches (1: CFG off; 2: prompt, negative) as this rank's plan
    shares them: both here, or one here and one on the other rank of its CFG group."""
    if count == 1:
        return [branch(0)]
    if parallel.cfg_group is not None:
        return list(cfg_parallel(branch, parallel.cfg_group))
    return [branch(0), branch(1)]


def check_heads(parallel: ParallelPlan, heads: int) -> None:
    """Refuse, in one line, a plan whose sequence group does not divide the model's `heads` attention heads
    (Ulysses gives each rank H/N of them), before any exchange."""
    if parallel.seq_group is None or heads % (n := group_size(parallel.seq_group)) == 0:
        return
    counts = ", ".join(str(d) for d in range(2, heads + 1) if heads % d == 0)
    raise InputError(f"--parallel {parallel.mode} splits the attention heads over {n} processes, and this model has "
                     f"{heads}", hint=f"use a process count that divides the head count ({heads}: {counts})")
