"""train-lora under torchrun with the frozen base sharded by FSDP2 (--shard-base; 2 gloo processes on the CPU):
the same losses, adapter and sample image as one process with the same global batch, rank 0 alone writing, and a
run that moves between one process and two sharded ones in both directions and ends where one process ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.training.test_distributed_training import _close, _steps, _train


@pytest.mark.slow
def test_sharded_base_trains_what_one_process_trains(tiny_qwen: Path, one_process_run: Any, tmp_path: Path) -> None:
    ref = one_process_run  # tests/training/conftest.py: 4 steps in one process, a sample every 2
    one = ref.done
    two = _train(tiny_qwen, ref.data, tmp_path / "two", 2, 2, "--shard-base", "-v", *ref.samples)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "sharded over 2 processes" in two.stderr and "Warning" not in two.stderr
    assert [e["step"] for e in _steps(two)] == [1, 2]  # rank 0 alone reports
    assert [e["loss"] for e in _steps(two)] == pytest.approx([e["loss"] for e in _steps(one)][:2], rel=1e-4)
    assert [e["grad_norm"] for e in _steps(two)] == pytest.approx([e["grad_norm"] for e in _steps(one)][:2],
                                                                   rel=1e-4)
    _close(load_file(str(ref.run / "lora-step000002.safetensors")),
           load_file(str(tmp_path / "two" / "lora-step000002.safetensors")))
    # Both ranks made the sample (each forward gathers the shards); rank 0 alone wrote it.
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == ["step000002-00.png"]
    a, b = (np.asarray(Image.open(run / "samples" / "step000002-00.png"), dtype=np.int16)
            for run in (ref.run, tmp_path / "two"))
    assert np.abs(a - b).max() <= 1

    # two sharded processes -> one -> two sharded: the end is one process's end
    rest = _train(tiny_qwen, ref.data, tmp_path / "two", 1, 3, "--resume")
    assert rest.returncode == 0, rest.stderr[-2000:]
    last = _train(tiny_qwen, ref.data, tmp_path / "two", 2, 4, "--resume", "--shard-base")
    assert last.returncode == 0, last.stderr[-3000:]
    assert [e["loss"] for e in _steps(rest) + _steps(last)] == pytest.approx(
        [e["loss"] for e in _steps(one)][2:], rel=1e-4)
    _close(load_file(str(ref.run / "lora.safetensors")), load_file(str(tmp_path / "two" / "lora.safetensors")))
