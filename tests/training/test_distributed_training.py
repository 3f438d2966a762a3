"""train-lora under torchrun (2 gloo processes on the CPU): the same adapter as one process with the same global
batch (micro-batches shared out, gradients summed), rank 0 alone writing, and a run that resumes on another
process count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.test_trainer import _dataset

REPO = Path(__file__).resolve().parents[2]


def _train(model: Path, data: Path, run: Path, ranks: int, steps: int, *extra: str) -> subprocess.CompletedProcess:
    args = ["train-lora", "--model", str(model), "--data", str(data), "--device", "cpu", "--dtype", "float32",
            "--rank", "4", "--resolution", "256", "--grad-accum", "4", "--steps", str(steps), "--save-every", "2",
            "--seed", "3", "--lr", "1e-2", "-o", str(run), "--json", *extra]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    launch = [sys.executable, "-m", "qimg"] if ranks == 1 else [*torchrun, "-m", "qimg"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([*launch, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "lora.safetensors"))


@pytest.mark.slow
def test_two_processes_train_the_adapter_one_process_trains(tiny_qwen: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", n=4)
    one = _train(tiny_qwen, data, tmp_path / "one", 1, 4)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _train(tiny_qwen, data, tmp_path / "two", 2, 4)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert set(a) == set(b)
    # Trained in fp32 on the same micro-batches and noise; only the order of the gradient sums differs. The file
    # stores bf16, where that noise can move a value by one step (2^-8 relative); summing without the other rank
    # moves them by percents (checked by hand: 0.0391 against 0.0361).
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=2**-7, atol=1e-6), key
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k or ".up" in k)
    steps = [json.loads(x) for x in two.stdout.splitlines() if x.startswith("{")]
    assert [e["step"] for e in steps if e["event"] == "step"] == [1, 2, 3, 4]  # rank 0 alone reports
    losses_one = [json.loads(x)["loss"] for x in one.stdout.splitlines() if '"event": "step"' in x]
    losses_two = [e["loss"] for e in steps if e["event"] == "step"]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)  # the loss of the whole global batch, summed over ranks

    # a run saved by 2 processes resumes on 1 and ends where one process alone ends
    part = _train(tiny_qwen, data, tmp_path / "mixed", 2, 2)
    assert part.returncode == 0, part.stderr[-2000:]
    rest = _train(tiny_qwen, data, tmp_path / "mixed", 1, 4, "--resume")
    assert rest.returncode == 0, rest.stderr[-2000:]
    c = _adapter(tmp_path / "mixed")
    for key in a:
        assert torch.allclose(a[key].float(), c[key].float(), rtol=2**-7, atol=1e-6), key
