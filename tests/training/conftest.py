"""What the distributed training tests share: one process's reference run (4 steps, the global batch of 4
micro-batches, a sample every 2 steps), made once, against which the 2-process runs are held."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.training.test_distributed_training import _train
from tests.training.test_trainer import _dataset


@dataclass(frozen=True)
class Reference:
    data: Path
    samples: tuple[str, ...]  # the sampling flags every run of these tests passes
    run: Path
    done: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def one_process_run(tiny_qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("one-process-training")
    data = _dataset(root / "data", n=4)
    prompts = root / "samples.jsonl"
    prompts.write_text('{"prompt": "a sks thing", "seed": 5, "width": 32, "height": 32, "steps": 2}\n',
                       encoding="utf-8")
    samples = ("--sample-every", "2", "--sample-prompts", str(prompts))
    done = _train(tiny_qwen, data, root / "one", 1, 4, *samples)
    assert done.returncode == 0, done.stderr[-2000:]
    return Reference(data, samples, root / "one", done)
