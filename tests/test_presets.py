"""Presets (qimg/presets.py): the Lightning schedule equals the releases' scheduler config in diffusers, a preset
stands in for the model's defaults but never for explicit values, and it is shown, recorded and replayed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.presets import LN3, PRESETS, suggest_preset
from qimg.sampling import FlowSchedule, flow_sigmas
from qimg.specs import SPECS
from tests.fixtures import QWEN_SCHEDULER

# The scheduler config the Lightning releases pass to FlowMatchEulerDiscreteScheduler.from_config
# (ModelTC/Qwen-Image-Lightning generate_with_diffusers.py), written out here as the oracle's input.
LIGHTNING_CONFIG = dict(base_image_seq_len=256, base_shift=math.log(3), invert_sigmas=False, max_image_seq_len=8192,
                        max_shift=math.log(3), num_train_timesteps=1000, shift=1.0, shift_terminal=None,
                        stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                        use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)
QWEN_IMAGE_CONFIG = dict(QWEN_SCHEDULER, max_shift=1.15, max_image_seq_len=4096, shift_terminal=None)


def _diffusers_sigmas(steps: int, seq_len: int, config: dict) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    c = sched.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas


@pytest.mark.parity
@pytest.mark.parametrize("name", ["lightning-8", "lightning-4"])
@pytest.mark.parametrize("model_config", [QWEN_SCHEDULER, QWEN_IMAGE_CONFIG], ids=["2512-like", "qwen-image"])
@pytest.mark.parametrize("size", [(1024, 1024), (1664, 928), (64, 48)])
def test_lightning_schedule_equals_the_release_config_in_diffusers(name, model_config, size):
    """Whatever the model's own schedule (the -2512 one has a terminal shift and another max_shift), the preset's
    overrides give the Lightning release's sigmas bit for bit."""
    preset = PRESETS[name]
    request, _ = qimg.make_request(SPECS["qwen-image"], "a fox", preset=name, width=size[0], height=size[1])
    schedule = request.flow_schedule(FlowSchedule(**model_config))
    seq = (size[0] // 16) * (size[1] // 16)
    ours = flow_sigmas(preset.steps, schedule, seq)
    assert torch.equal(ours, _diffusers_sigmas(preset.steps, seq, LIGHTNING_CONFIG))
    assert schedule.base_shift == schedule.max_shift == LN3 and schedule.shift_terminal is None


def test_a_preset_fills_defaults_and_explicit_values_win():
    spec = SPECS["qwen-image"]
    request, _ = qimg.make_request(spec, "a fox", preset="lightning-8")
    assert (request.steps, request.cfg, request.cfg_enabled) == (8, 1.0, False)
    assert request.preset == "lightning-8" and dict(request.schedule)["base_shift"] == LN3
    request, _ = qimg.make_request(spec, "a fox", preset="lightning-4", steps=6, cfg=2.5)
    assert (request.steps, request.cfg, request.preset) == (6, 2.5, "lightning-4")
    distill, _ = qimg.make_request(spec, "a fox", preset="distill")
    assert (distill.steps, distill.cfg, distill.schedule) == (15, 1.0, ())
    assert distill.flow_schedule(FlowSchedule(**QWEN_SCHEDULER)) == FlowSchedule(**QWEN_SCHEDULER)
    plain, _ = qimg.make_request(spec, "a fox")
    assert plain.preset is None and plain.schedule == () and plain.as_dict()["schedule"] == {}
    with pytest.raises(qimg.QimgError, match="unknown preset 'turbo'"):
        qimg.make_request(spec, "a fox", preset="turbo")


def test_file_names_suggest_their_preset():
    assert suggest_preset("Qwen-Image-Lightning-8steps-V1.1.safetensors") == "lightning-8"
    assert suggest_preset("/x/Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors") == "lightning-4"
    assert suggest_preset("my_lightning_lora.safetensors") == "lightning-8"  # no count: the 8-step one
    assert suggest_preset("style-8steps.safetensors") is None  # only files that say Lightning


@pytest.mark.parity
@pytest.mark.slow
def test_lightning_preset_generate_matches_diffusers_with_the_release_scheduler(tiny_qwen_pipe_and_dir):
    """The whole text-to-image run under lightning-4 equals diffusers' pipeline given the release's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref, folder = tiny_qwen_pipe_and_dir
    ours = qimg.load(folder, device="cpu", dtype="float32")
    job = qimg.prepare_generate(ours.ref, "a lighthouse at dusk", seed=3, width=64, height=48, preset="lightning-4")
    own = ref.scheduler
    ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_CONFIG)
    try:
        with torch.no_grad():
            want = ref(prompt="a lighthouse at dusk", negative_prompt=" ", true_cfg_scale=1.0, num_inference_steps=4,
                       width=64, height=48, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    finally:
        ref.scheduler = own
    image = np.asarray(ours.run(job)[0]).astype(np.int16)
    # fp32 on both sides: uint8 values within rounding distance of .5 may land one level apart.
    assert np.abs(image - np.round(want * 255).astype(np.int16)).max() <= 1
    plain = np.asarray(ours.run(qimg.prepare_generate(ours.ref, "a lighthouse at dusk", seed=3, width=64, height=48,
                                                      steps=4, cfg=1.0))[0]).astype(np.int16)
    assert not np.array_equal(plain, image)  # the schedule really changed


def _lightning_named_lora(tmp_path: Path) -> Path:
    """A kohya-style LoRA (all zeros: it changes nothing) under a Lightning release's file name."""
    path = tmp_path / "Qwen-Image-Lightning-4steps-V1.0.safetensors"
    key = "lora_unet_transformer_blocks_0_attn_to_q"
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 32), f"{key}.lora_up.weight": torch.zeros(32, 2)},
              str(path))
    return path


def test_cli_preset_is_shown_recorded_replayed_and_hinted(tiny_qwen, tmp_path, one_thread):
    runner = CliRunner()
    base = ["generate", "a fox", "--model", str(tiny_qwen), "--device", "cpu", "--width", "32", "--height", "32",
            "--seed", "1"]
    fast = runner.invoke(app, [*base, "-o", str(tmp_path / "fast.png"), "--preset", "lightning-4", "-v"])
    assert fast.exit_code == 0, fast.output
    assert "preset lightning-4: 4 steps, CFG off, shift ln 3" in fast.stderr and "CFG off" in fast.stderr
    params = qimg.read_params(tmp_path / "fast.png")
    assert params["preset"] == "lightning-4" and params["steps"] == 4 and params["cfg"] == 1.0
    assert params["schedule"]["base_shift"] == LN3 and params["schedule"]["shift_terminal"] is None
    replayed = qimg.replay(tmp_path / "fast.png")
    assert replayed["preset"] == "lightning-4" and replayed["steps"] == 4
    again = runner.invoke(app, ["generate", "--from", str(tmp_path / "fast.png"), "-o", str(tmp_path / "again.png"),
                                "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(qimg.open_image(tmp_path / "fast.png")),
                          np.asarray(qimg.open_image(tmp_path / "again.png")))

    lora = _lightning_named_lora(tmp_path)
    hinted = runner.invoke(app, [*base, "-o", str(tmp_path / "h.png"), "--steps", "1", "--lora", str(lora)])
    assert hinted.exit_code == 0, hinted.output
    assert "looks like a Lightning LoRA; add --preset lightning-4" in hinted.stderr
    quiet = runner.invoke(app, [*base, "-o", str(tmp_path / "q.png"), "--preset", "lightning-4", "--steps", "1",
                                "--lora", str(lora)])
    assert quiet.exit_code == 0 and "looks like a Lightning LoRA" not in quiet.stderr
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "bad.png"), "--preset", "turbo"])
    assert bad.exit_code == 2 and not (tmp_path / "bad.png").exists()


def test_batch_compares_the_preset(tiny_qwen, tmp_path, one_thread):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n", encoding="utf-8")
    runner = CliRunner()
    base = ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "out"), "--model", str(tiny_qwen),
            "--device", "cpu", "--width", "32", "--height", "32", "--steps", "1"]
    first = runner.invoke(app, [*base, "--preset", "lightning-8", "--json"])
    assert first.exit_code == 0, first.output
    same = runner.invoke(app, [*base, "--preset", "lightning-8", "--json"])
    assert '"event": "skipped"' in same.stdout and '"reason": "unchanged"' in same.stdout, same.stdout
    changed = runner.invoke(app, [*base, "--json"])
    assert changed.exit_code == 0 and '"event": "written"' in changed.stdout, changed.output
    assert "(cfg, preset differ)" in changed.stderr


def test_edit_jobs_take_a_preset(tiny_edit_model, tmp_path):
    from PIL import Image

    _, folder = tiny_edit_model("edit-2509")
    picture = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(picture)
    job = qimg.prepare_edit(folder, "make it blue", [picture], preset="lightning-8")
    assert (job.request.steps, job.request.cfg_enabled, job.request.preset) == (8, False, "lightning-8")
    lora = _lightning_named_lora(tmp_path)
    hinted = qimg.prepare_edit(folder, "make it blue", [picture], loras=[(lora, 1.0)])
    assert any("add --preset lightning-4" in note for note in hinted.notes)


def test_a_prompt_file_line_takes_its_own_preset(tiny_qwen, tmp_path):
    text = ('{"prompt": "a fox", "preset": "lightning-4"}\n{"prompt": "a cat", "preset": "lightning-4", "steps": 6}\n'
            '{"prompt": "an owl"}\n')
    lines = qimg.read_prompts(_write(tmp_path / "p.jsonl", text))
    ref = qimg.resolve_model(str(tiny_qwen))
    plan = qimg.plan_batch(ref, lines, tmp_path / "out", defaults={"steps": 30, "cfg": 3.0})
    got = [(i.request.preset, i.request.steps, i.request.cfg) for i in plan.items]
    assert got == [("lightning-4", 4, 1.0), ("lightning-4", 6, 1.0), (None, 30, 3.0)]
    bad = qimg.read_prompts(_write(tmp_path / "bad.csv", "prompt,preset\na fox,turbo\n"))
    with pytest.raises(qimg.PromptFileError, match=r"<prompts>:2: unknown preset 'turbo'; known: lightning-8"):
        qimg.plan_batch(ref, bad, tmp_path / "out")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
