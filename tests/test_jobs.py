"""Jobs and replay in the library: what the CLI used to decide (task checks, the strength default, the negative
of saved embeddings, the plan shape, --from) is decided before any model loads, for library callers too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import qimg
from qimg.embeddings import EmbeddingsFile, PromptEmbeds


def _no_load(monkeypatch):
    monkeypatch.setattr(qimg, "load", lambda *a, **k: pytest.fail("a model was loaded"))


def test_task_checks_run_before_loading(tiny_qwen: Path, tiny_qwen_edit_pipe_and_dir, monkeypatch):
    _no_load(monkeypatch)
    with pytest.raises(qimg.UsageError, match="is a text-to-image model"):
        qimg.prepare_edit(tiny_qwen, "a hat", [Image.new("RGB", (32, 32))])
    edit_dir = tiny_qwen_edit_pipe_and_dir[1]
    with pytest.raises(qimg.UsageError, match="is an edit model"):
        qimg.prepare_generate(edit_dir, "a hat")
    with pytest.raises(qimg.UsageError, match="takes 1 to at most 1 input images, got 2"):
        qimg.prepare_edit(edit_dir, "a hat", [Image.new("RGB", (32, 32))] * 2)


def test_img2img_strength_defaults_in_the_request(tiny_qwen: Path):
    job = qimg.prepare_generate(tiny_qwen, "a fox", init_image=Image.new("RGB", (64, 48)), steps=2)
    assert job.request.strength == 0.6
    assert qimg.prepare_generate(tiny_qwen, "a fox", steps=2).request.strength is None
    with pytest.raises(qimg.UsageError, match="need --init-image"):
        qimg.prepare_generate(tiny_qwen, "a fox", mask=Image.new("L", (64, 48)))


def test_saved_embeddings_without_a_negative_turn_cfg_off(tiny_qwen: Path, tmp_path: Path):
    data = EmbeddingsFile(PromptEmbeds(torch.zeros(1, 3, 8)), None,
                          {"family": "qwen-image", "template": "qwen-image-t2i", "prompt": "a fox", "negative": None})
    job = qimg.prepare_generate(tiny_qwen, prompt_embeds=data, cfg=4.0)
    assert job.request.negative is None and not job.request.cfg_enabled
    assert job.shape == qimg.RequestShape(1024, 1024, cfg=False, ref_pixels=0, text_encoder=False)
    with pytest.raises(qimg.UsageError, match="either PROMPT or --prompt-embeds"):
        qimg.prepare_generate(tiny_qwen, "a fox", prompt_embeds=data)


def test_edit_job_shape_counts_reference_pixels(tiny_qwen_edit_pipe_and_dir):
    job = qimg.prepare_edit(tiny_qwen_edit_pipe_and_dir[1], "a hat", [Image.new("RGB", (40, 32))], steps=1)
    assert job.shape.ref_pixels == job.ref.spec.vae_image_area and job.method == "edit"


def test_replay_remakes_the_image_from_the_library(tiny_qwen: Path, tmp_path: Path, one_thread):
    first = qimg.generate(tiny_qwen, "a lighthouse", device="cpu", seed=5, steps=2, width=32, height=32, cfg=4.0)
    path = qimg.save_png(first[0], tmp_path / "a.png")
    args = qimg.replay(path)
    assert (args["prompt"], args["seed"], args["steps"], args["width"]) == ("a lighthouse", 5, 2, 32)
    again = qimg.generate(**{**args, "options": qimg.RuntimeOptions(device="cpu")})
    assert np.array_equal(np.asarray(again[0]), np.asarray(first[0]))
    assert qimg.replay(path, seed=6)["seed"] == 6  # given values win


def test_edit_one_shot(tiny_qwen_edit_pipe_and_dir, one_thread):
    out = qimg.edit(tiny_qwen_edit_pipe_and_dir[1], "a hat", [Image.new("RGB", (40, 32), (200, 10, 10))],
                    qimg.RuntimeOptions(device="cpu"), steps=1, seed=1, width=32, height=32)
    assert out[0].size == (32, 32) and out[0].info["qimg"]["prompt"] == "a hat"
