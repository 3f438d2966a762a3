"""qimg train-lora on the tiny Qwen-Image and tiny datasets written here: the loss falls on an image it overfits,
the file loads in diffusers and changes its image, a stopped run resumes bit for bit, the cache recomputes only
what changed, and the CLI's outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.training.trainer import TrainConfig, Trainer, train_items


def _dataset(folder: Path, n: int = 2, size: tuple[int, int] = (256, 256)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        yy, xx = np.mgrid[0:size[1], 0:size[0]] / max(size)
        picture = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + rng.random((size[1], size[0], 3)) * 55
        Image.fromarray(picture.astype(np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks thing number {i}", encoding="utf-8")
    return folder


def _config(tiny_qwen: Path, data: Path, **changes) -> TrainConfig:
    base = dict(model=str(tiny_qwen), data=str(data), steps=6, rank=4, alpha=4.0, lr=1e-3, warmup=2,
                resolution=256, save_every=3, keep=2)
    return TrainConfig(**{**base, **changes})


def test_steps_reduce_the_loss_on_an_image_it_overfits(tiny_qwen, tmp_path, one_thread):
    data = _dataset(tmp_path / "data", n=1)
    config = _config(tiny_qwen, data, steps=30, lr=2e-2, save_every=30)
    pipe = qimg.load(tiny_qwen, device="cpu", dtype="float32")
    trainer = Trainer(config, tmp_path / "run", pipe)
    (tmp_path / "run").mkdir()
    trainer.prepare(train_items(config, pipe.ref))
    with torch.no_grad():  # the same noise and timestep before and after: a fixed probe of the fit
        before = [float(trainer.loss([0], step=1000 + k, micro=0)) for k in range(4)]
    trainer.run()
    with torch.no_grad():
        after = [float(trainer.loss([0], step=1000 + k, micro=0)) for k in range(4)]
    assert sum(after) < 0.8 * sum(before), (before, after)
    rows = (tmp_path / "run" / "log.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "step,loss,lr,grad_norm,seconds" and len(rows) == 31


def test_the_lora_loads_in_diffusers_and_in_qimg_and_changes_the_image(tiny_qwen_pipe_and_dir, tmp_path, one_thread):
    ref, folder = tiny_qwen_pipe_and_dir
    data = _dataset(tmp_path / "data", n=1)
    path = qimg.train_lora(_config(folder, data, steps=4, lr=5e-2, save_every=4), tmp_path / "run",
                           qimg.RuntimeOptions(device="cpu", dtype="float32"))
    assert path == tmp_path / "run" / "lora.safetensors"
    assert (tmp_path / "run" / "lora-step000004.safetensors").is_file()
    pipe = qimg.load(folder, device="cpu", dtype="float32")
    options = dict(steps=2, seed=1, width=64, height=64)
    plain = np.asarray(pipe.generate("a photo of sks thing", **options)[0])
    lora = pipe.load_lora(path)
    assert lora.dialect == "diffusers" and not lora.unmatched and len(lora.modules) == 2 * 12
    styled = np.asarray(pipe.generate("a photo of sks thing", **options)[0])
    assert not np.array_equal(plain, styled)
    call = dict(prompt="a photo of sks thing", negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=2,
                width=64, height=64)
    ref.load_lora_weights(str(path), adapter_name="trained")
    try:
        with torch.no_grad():
            want = ref(**call, generator=torch.Generator("cpu").manual_seed(1), output_type="np").images[0]
    finally:
        ref.delete_adapters("trained")
    # diffusers applies the file with the same scale (alpha from the header): the same image, within uint8 rounding.
    assert np.abs(styled.astype(np.int16) - np.round(want * 255).astype(np.int16)).max() <= 1


def test_a_stopped_run_resumes_bit_for_bit(tiny_qwen, tmp_path, one_thread):
    data = _dataset(tmp_path / "data", n=3)
    options = qimg.RuntimeOptions(device="cpu", dtype="float32")
    config = _config(tiny_qwen, data, steps=7, save_every=5, grad_accum=2)
    whole = qimg.train_lora(config, tmp_path / "whole", options)

    def stop_at_three(event):  # what Ctrl-C between steps does: KeyboardInterrupt out of the loop
        if event["event"] == "step" and event["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qimg.train_lora(config, tmp_path / "split", options, on_event=stop_at_three)
    state = json.loads((tmp_path / "split" / "state" / "latest.json").read_text(encoding="utf-8"))
    assert state == {"state": "step-000003"}
    assert not list((tmp_path / "split").rglob("*.tmp")) and not list((tmp_path / "split" / "state").glob(".tmp-*"))
    with pytest.raises(qimg.UsageError, match="already holds a training run"):
        qimg.train_lora(config, tmp_path / "split", options)
    with pytest.raises(qimg.UsageError, match="started with rank 4"):
        qimg.train_lora(_config(tiny_qwen, data, steps=7, rank=8), tmp_path / "split", options, resume=True)
    resumed = qimg.train_lora(config, tmp_path / "split", options, resume=True)
    a = load_file(str(tmp_path / "whole" / "state" / "step-000007" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "split" / "state" / "step-000007" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = load_file(str(whole)), load_file(str(resumed))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    logs = [(tmp_path / run / "log.csv").read_text(encoding="utf-8").splitlines() for run in ("whole", "split")]
    assert [r.split(",")[:2] for r in logs[0]] == [r.split(",")[:2] for r in logs[1]]


def test_the_cache_recomputes_only_a_changed_caption(tiny_qwen, tmp_path, one_thread):
    data = _dataset(tmp_path / "data", n=2)
    options = qimg.RuntimeOptions(device="cpu", dtype="float32")
    events: list[dict] = []
    qimg.train_lora(_config(tiny_qwen, data, steps=1, save_every=1), tmp_path / "run", options,
                    on_event=events.append)
    assert [e["total"] for e in events if e["event"] == "cached"] == [2, 2]
    (data / "img1.txt").write_text("a different caption", encoding="utf-8")
    events.clear()
    qimg.train_lora(_config(tiny_qwen, data, steps=2, save_every=1), tmp_path / "run", options, resume=True,
                    on_event=events.append)
    cached = [e for e in events if e["event"] == "cached"]
    assert len(cached) == 1 and cached[0]["image"].endswith("img1.png")


def test_cli_train_lora(tiny_qwen, tmp_path, one_thread):
    data = _dataset(tmp_path / "data", n=1)
    runner = CliRunner()
    base = ["train-lora", "--model", str(tiny_qwen), "--data", str(data), "--device", "cpu", "--rank", "4",
            "--resolution", "256", "--steps", "2", "--save-every", "1"]
    done = runner.invoke(app, [*base, "-o", str(tmp_path / "run"), "--json"])
    assert done.exit_code == 0, done.output
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["step", "saved", "step", "saved"]
    assert (tmp_path / "run" / "lora.safetensors").is_file() and "wrote" in done.stderr
    again = runner.invoke(app, [*base, "-o", str(tmp_path / "run")])
    assert again.exit_code == 2 and "already holds a training run" in again.stderr
    (data / "img0.txt").unlink()
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "img0" in bad.stderr and not (tmp_path / "bad").exists()
    wrong = runner.invoke(app, [*base, "-o", str(tmp_path / "w"), "--targets", "everything"])
    assert wrong.exit_code == 2 and "unknown --targets" in wrong.stderr


def test_checkpointing_changes_no_number(tiny_qwen, tmp_path, one_thread):
    """Recomputing the blocks' activations in backward runs the same operations: the adapters after two steps
    are identical with and without checkpointing."""
    data = _dataset(tmp_path / "data", n=1)
    options = qimg.RuntimeOptions(device="cpu", dtype="float32")
    runs = {}
    for on in (True, False):
        qimg.train_lora(_config(tiny_qwen, data, steps=2, save_every=2, checkpointing=on), tmp_path / f"r{on}",
                        options)
        runs[on] = load_file(str(tmp_path / f"r{on}" / "state" / "step-000002" / "adapter.safetensors"))
    assert all(torch.equal(runs[True][k], runs[False][k]) for k in runs[True])


def test_cli_config_file_fp8_weights_and_refusals(tiny_qwen, tmp_path, one_thread):
    _dataset(tmp_path / "data", n=1)  # written where the config file says, relative to itself
    config = tmp_path / "fox.toml"
    config.write_text(f'model = "{tiny_qwen}"\ndata = "data"\noutput = "run"\nrank = 2\n'
                      f'batch-size = 1\nsteps = 5\nresolution = 256\ndevice = "cpu"\nsave_every = 1\n',
                      encoding="utf-8")
    runner = CliRunner()
    # data and output are relative to the config file, not to the working folder
    done = runner.invoke(app, ["train-lora", "--config", str(config), "--steps", "1", "--fp8", "weights"])
    assert done.exit_code == 0, done.output
    saved = json.loads((tmp_path / "run" / "state" / "step-000001" / "state.json").read_text(encoding="utf-8"))
    assert saved["config"]["rank"] == 2 and saved["config"]["steps"] == 1  # the file's rank, the typed steps
    compute = runner.invoke(app, ["train-lora", "--config", str(config), "-o", str(tmp_path / "c"), "--fp8",
                                  "compute"])
    assert compute.exit_code == 2 and "--fp8 compute cannot train" in compute.stderr
    config.write_text('colour = "red"\n', encoding="utf-8")
    unknown = runner.invoke(app, ["train-lora", "--config", str(config)])
    assert unknown.exit_code == 2 and "unknown key 'colour'" in unknown.stderr


def test_cli_resume_takes_the_runs_settings_unless_typed_otherwise(tiny_qwen, tmp_path, one_thread):
    data = _dataset(tmp_path / "data", n=1)
    runner = CliRunner()
    run = ["-o", str(tmp_path / "run"), "--device", "cpu", "--save-every", "1"]
    first = runner.invoke(app, ["train-lora", "--model", str(tiny_qwen), "--data", str(data), "--rank", "4",
                                "--alpha", "2", "--resolution", "256", "--steps", "1", *run])
    assert first.exit_code == 0, first.output
    # Neither the model, the data, the rank nor the resolution again: they are the run's.
    more = runner.invoke(app, ["train-lora", "--resume", "--steps", "2", *run])
    assert more.exit_code == 0, more.output
    saved = json.loads((tmp_path / "run" / "state" / "step-000002" / "state.json").read_text(encoding="utf-8"))
    assert (saved["config"]["rank"], saved["config"]["alpha"], saved["config"]["steps"]) == (4, 2.0, 2)
    other = runner.invoke(app, ["train-lora", "--resume", "--steps", "3", "--rank", "8", *run])
    assert other.exit_code == 2 and "started with rank 4, not 8" in other.stderr


def test_samples_during_training_leave_the_run_exact(tiny_qwen, tmp_path, one_thread):
    """Sample images (prompts encoded once, the adapter live) come out every N steps with the file's seeds, and
    sampling draws nothing from the training's random streams: the adapter equals a run without samples."""
    data = _dataset(tmp_path / "data", n=1)
    prompts = tmp_path / "samples.jsonl"
    prompts.write_text('{"prompt": "a sks thing", "seed": 5, "width": 32, "height": 32, "steps": 1}\n'
                       '{"prompt": "another sks thing", "width": 32, "height": 32, "steps": 1}\n', encoding="utf-8")
    options = qimg.RuntimeOptions(device="cpu", dtype="float32")
    events: list[dict] = []
    qimg.train_lora(_config(tiny_qwen, data, steps=2, save_every=2, sample_every=1, sample_prompts=str(prompts)),
                    tmp_path / "with", options, on_event=events.append)
    qimg.train_lora(_config(tiny_qwen, data, steps=2, save_every=2), tmp_path / "without", options)
    written = sorted(p.name for p in (tmp_path / "with" / "samples").glob("*.png"))
    assert written == ["step000001-00.png", "step000001-01.png", "step000002-00.png", "step000002-01.png"]
    seeds = [qimg.read_params(tmp_path / "with" / "samples" / name)["seed"] for name in written[:2]]
    assert seeds == [5, 1]  # the line's seed, else --seed (0) + the line's index
    assert sum(e["event"] == "sample" for e in events) == 4
    a = load_file(str(tmp_path / "with" / "state" / "step-000002" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "without" / "state" / "step-000002" / "adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(qimg.UsageError, match="--sample-every needs --sample-prompts"):
        _config(tiny_qwen, data, sample_every=1)
