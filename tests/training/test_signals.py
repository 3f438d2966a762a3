"""A real signal to a running `qimg train-lora` process: SIGINT or SIGTERM between or during steps saves the
state of the last finished step and exits 130, with no partial file left; --resume then continues to exactly the
adapter an uninterrupted run reaches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from tests.training.test_trainer import _dataset


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_resumable_state_and_exits_130(tiny_qwen, tmp_path, sig):
    data = _dataset(tmp_path / "data", n=2)
    run = tmp_path / "run"
    base = ["train-lora", "--model", str(tiny_qwen), "--data", str(data), "--device", "cpu", "--rank", "4",
            "--resolution", "256", "--save-every", "100", "--seed", "3", "-o", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qimg", *base, "--steps", "100000", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first finished step: the run is training now
            if json.loads(line)["event"] == "step":
                proc.send_signal(sig)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    saved = json.loads((run / "state" / "latest.json").read_text(encoding="utf-8"))["state"]
    step = int(saved.removeprefix("step-"))
    assert step >= 1
    assert not list(run.rglob("*.tmp")) and not list((run / "state").glob(".tmp-*"))
    done = CliRunner().invoke(app, [*base, "--resume", "--steps", str(step + 2)])
    assert done.exit_code == 0, done.output
    config = qimg.TrainConfig(model=str(tiny_qwen), data=str(data.resolve()), rank=4, resolution=256,
                              save_every=100, seed=3, steps=step + 2)
    whole = qimg.train_lora(config, tmp_path / "whole", qimg.RuntimeOptions(device="cpu"))
    a, b = load_file(str(whole)), load_file(str(run / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
