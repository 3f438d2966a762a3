"""Run by tests/runtime/test_sequence_parallel.py under torchrun (gloo, CPU): every rank builds the same tiny
Qwen-Image MMDiT and FLUX.1 transformer, computes the single-process outputs itself, then the sequence-parallel
and CFG-parallel ones, and writes the largest differences (rank 0) as JSON to argv[1]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qimg.nets.flux import FluxTransformer, flux_ids, flux_rope  # noqa: E402
from qimg.nets.qwen_mmdit import QwenMMDiT, qwen_rope  # noqa: E402
from qimg.runtime.sequence_parallel import cfg_parallel, sequence_parallel  # noqa: E402
from qimg.specs import FluxParams, QwenMMDiTParams  # noqa: E402
from tests.fixtures import randomize_  # noqa: E402

# 6 heads: divisible by 2 and 3 ranks; 7 text and 36 image tokens: shares of unequal length on 3 ranks
QWEN = QwenMMDiTParams(num_layers=2, head_dim=8, num_heads=6, txt_dim=32, axes_dims_rope=(2, 2, 4))
FLUX = FluxParams(num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=6,
                  joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    out: dict[str, float] = {}
    with torch.inference_mode():
        qwen = randomize_(QwenMMDiT(QWEN), 3).eval()
        gen = torch.Generator().manual_seed(1)
        img = torch.randn(2, 36, 64, generator=gen)
        txt = torch.randn(2, 7, 32, generator=gen)
        t = torch.tensor([0.3, 0.7])
        rope = qwen_rope([(1, 6, 6)], 7, QWEN.axes_dims_rope)
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, 5:] = False  # the second prompt is shorter: padding keys must stay masked across the shares
        want = qwen(img, txt, t, rope, mask)
        got = sequence_parallel(lambda i, c, r, **kw: qwen(i, c, t, r, **kw), img, txt, rope, txt_mask=mask)
        out["qwen_seq"] = float((got - want).abs().max())

        edit = randomize_(QwenMMDiT(QwenMMDiTParams(**{**QWEN.__dict__, "zero_cond_t": True})), 4).eval()
        want = edit(img, txt, t, rope, None, n_target=20)  # 20 target tokens, 16 reference tokens after them
        got = sequence_parallel(lambda i, c, r, **kw: edit(i, c, t, r, **kw), img, txt, rope, n_target=20)
        out["qwen_edit_seq"] = float((got - want).abs().max())

        flux = randomize_(FluxTransformer(FLUX), 5).eval()
        x = torch.randn(2, 36, 64, generator=gen)
        pooled = torch.randn(2, 16, generator=gen)
        g = torch.tensor([3.5, 3.5])
        frope = flux_rope(flux_ids(7, [(0, 6, 6)]), FLUX.axes_dims_rope)
        want = flux(x, txt, t, g, pooled, frope)
        got = sequence_parallel(lambda i, c, r: flux(i, c, t, g, pooled, r), x, txt, frope)
        out["flux_seq"] = float((got - want).abs().max())

        if dist.get_world_size() == 2:  # CFG parallel: rank 0 the prompt, rank 1 the negative
            branches = [(img[:1], txt[:1], mask[:1]), (img[1:], txt[1:, :5], None)]

            def branch(i: int) -> torch.Tensor:
                bi, bt, bm = branches[i]
                return qwen(bi, bt, t[:1], qwen_rope([(1, 6, 6)], bt.shape[1], QWEN.axes_dims_rope), bm)

            cond, uncond = cfg_parallel(branch)
            out["cfg_cond"] = float((cond - branch(0)).abs().max())
            out["cfg_uncond"] = float((uncond - branch(1)).abs().max())
    rank = dist.get_rank()
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(out))
    dist.barrier()  # every rank done with every collective before any tears its group down
    dist.destroy_process_group()
    # Nothing may keep the group alive past its teardown: its gloo threads would be torn down with the
    # interpreter, which now and then aborts the process at exit ("terminate called without an active exception").
    left = _gloo_threads()
    if left:
        sys.exit(f"rank {rank}: gloo threads outlived destroy_process_group: {left}")


def _gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():  # not Linux: nothing to check
        return []
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir() if (t / "comm").exists()]
    return [n for n in names if "gloo" in n]


if __name__ == "__main__":
    main()
