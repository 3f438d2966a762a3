"""Sequence-parallel (Ulysses) and CFG-parallel transformer outputs equal the single-process ones: 2 and 3 gloo
processes under torchrun on tiny Qwen-Image (plain and edit, with a padded prompt) and FLUX.1 transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qimg.runtime.sequence_parallel import token_slice

REPO = Path(__file__).resolve().parents[2]


def test_token_shares_cover_the_sequence_once() -> None:
    for length in (0, 1, 7, 36, 4096):
        for size in (1, 2, 3, 4):
            shares = [token_slice(length, r, size) for r in range(size)]
            assert [s.start for s in shares[1:]] == [s.stop for s in shares[:-1]]
            assert shares[0].start == 0 and shares[-1].stop == length
            assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1


def test_a_head_count_the_processes_do_not_divide_is_refused_before_any_exchange(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from qimg.embeddings import PromptEmbeds
    from qimg.errors import InputError
    from qimg.nets.qwen_mmdit import QwenMMDiT
    from qimg.pipelines.qwen import qwen_velocity
    from qimg.runtime import sequence_parallel
    from qimg.specs import QwenMMDiTParams

    model = QwenMMDiT(QwenMMDiTParams(num_layers=1, head_dim=8, num_heads=2, txt_dim=32, axes_dims_rope=(2, 2, 4)))
    # a group of 3 ranks, as `torchrun --nproc-per-node 3 ... --parallel seq` makes; nothing is exchanged
    monkeypatch.setattr(sequence_parallel, "group_size", lambda group: 3)
    plan = sequence_parallel.ParallelPlan("seq", seq_group=object(), cfg_group=None, branch=0)  # type: ignore[arg-type]
    prompt = PromptEmbeds(torch.zeros(1, 4, model.params.txt_dim))
    with pytest.raises(InputError, match="splits the attention heads over 3 processes, and this model has 2") as e:
        qwen_velocity(model, torch.float32, prompt, None, 1.0, [(1, 2, 2)], parallel=plan)
    assert "divides the head count" in (e.value.hint or "")


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_parallel_outputs_equal_one_process(tmp_path: Path, ranks: int) -> None:
    result = tmp_path / "diffs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                           str(REPO / "tests" / "runtime" / "sp_worker.py"), str(result)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    diffs = json.loads(result.read_text())
    assert {"qwen_seq", "qwen_edit_seq", "flux_seq"} <= set(diffs)
    if ranks == 2:
        assert {"cfg_cond", "cfg_uncond"} <= set(diffs)
    # fp32: the same arithmetic per token; attention sums its keys in another order (keys arrive by rank)
    assert max(diffs.values()) < 1e-5, diffs
