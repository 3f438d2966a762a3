"""train-lora's memory plan on the tiny Qwen-Image: a run whose blocks stream from host memory through forward
and backward (and are checkpointed) trains exactly the adapters of a resident run, and --verbose prints the
plan; the planner's choices themselves are tested in tests/runtime/test_planner.py."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.runtime.planner import TrainPlan
from qimg.training.trainer import Trainer, train_items
from tests.training.test_trainer import _config, _dataset


def _train(folder, data, run, plan: TrainPlan | None):
    config = _config(folder, data, steps=3, save_every=3, lr=1e-2)
    pipe = qimg.load(folder, device="cpu", dtype="float32")
    run.mkdir()
    trainer = Trainer(config, run, pipe)
    trainer.prepare(train_items(config, pipe.ref), plan=plan)
    trainer.run()
    return pipe, load_file(str(run / "lora.safetensors"))


def test_streamed_checkpointed_training_gives_the_resident_adapters(tiny_qwen, tmp_path, one_thread):
    data = _dataset(tmp_path / "data", n=2)
    _, resident = _train(tiny_qwen, data, tmp_path / "resident", None)
    plan = TrainPlan(budget=None, streamed=(1,), checkpointed=(0, 1), peak=0, blocks=2)
    pipe, streamed = _train(tiny_qwen, data, tmp_path / "streamed", plan)
    assert pipe.transformer_offload is not None and pipe.transformer_offload.streamed == [1]
    assert pipe.transformer_offload.backward and pipe.placement_fixed
    assert resident.keys() == streamed.keys() and all(torch.equal(resident[k], streamed[k]) for k in resident)
    assert any(v.abs().sum() > 0 for k, v in streamed.items() if "lora_B" in k)  # it did train


def test_cli_verbose_prints_the_training_plan(tiny_qwen, tmp_path, one_thread):
    data = _dataset(tmp_path / "data", n=1)
    done = CliRunner().invoke(app, ["train-lora", "--model", str(tiny_qwen), "--data", str(data), "--device", "cpu",
                                    "--rank", "4", "--resolution", "256", "--steps", "1", "--verbose", "-o",
                                    str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    assert "training memory plan: VRAM budget none" in done.stderr  # the CPU: no limit
    assert "gradient checkpointing: 0 of 2 blocks" in done.stderr  # a tiny model fits without it
