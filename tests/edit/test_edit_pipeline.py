"""Edit pipelines end to end against diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import qimg
from qimg.errors import InputError
from qimg.pipelines import run_qwen_edit
from tests.fixtures_edit import forwarding_mm_token_type_ids

pytestmark = [pytest.mark.parity, pytest.mark.slow]


def _picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 7.0 + yy / 11.0)], -1)
    return Image.fromarray(((0.85 * base + 0.15 * rng.random((height, width, 3))) * 255).astype(np.uint8))


def _parity(ref_pipe, folder, images, size=(64, 48), cfg=4.0, seed=3, steps=2):
    ours = qimg.load(folder, device="cpu")
    width, height = size
    prompt = "make the sky purple"
    call = dict(prompt=prompt, negative_prompt=" ", true_cfg_scale=cfg, num_inference_steps=steps, width=width,
                height=height, output_type="latent")
    image_arg = images[0] if len(images) == 1 and ours.ref.spec.max_images == 1 else images
    with torch.no_grad(), forwarding_mm_token_type_ids(ref_pipe.text_encoder):
        want = ref_pipe(image=image_arg, **call, generator=torch.Generator("cpu").manual_seed(seed)).images
    request, _ = qimg.make_request(ours.ref.spec, prompt, negative=" ", cfg=cfg, steps=steps, width=width,
                                   height=height, seed=seed)
    with torch.inference_mode():
        data = ours.encode_prompts(request, images=images)
        got = run_qwen_edit(ours, request, data.cond, data.uncond, images)
    assert got.shape == want.shape
    # fp32; prompt embeddings are identical, the rest is summation-order rounding over two steps.
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    return ours


def test_edit_matches_diffusers(tiny_qwen_edit_pipe_and_dir):
    ref, folder = tiny_qwen_edit_pipe_and_dir
    _parity(ref, folder, [_picture(120, 90, 0)])


def test_edit_without_cfg_matches_diffusers(tiny_qwen_edit_pipe_and_dir):
    ref, folder = tiny_qwen_edit_pipe_and_dir
    _parity(ref, folder, [_picture(90, 120, 1)], cfg=1.0, size=(48, 64))


@pytest.mark.parametrize("variant", ["2509", "2511"])
def test_edit_plus_with_two_images_matches_diffusers(request, variant):
    ref, folder = request.getfixturevalue(f"tiny_qwen_edit_{variant}_pipe_and_dir")
    ours = _parity(ref, folder, [_picture(120, 90, 2), _picture(60, 100, 3)])
    assert ours.transformer.params.zero_cond_t == (variant == "2511")


def test_output_size_follows_the_last_image_and_keep_size_restores_the_first(tiny_qwen_edit_2509_pipe_and_dir):
    _, folder = tiny_qwen_edit_2509_pipe_and_dir
    pipe = qimg.load(folder, device="cpu")
    first, last = _picture(90, 60, 4), _picture(64, 64, 5)
    request, notes = qimg.make_request(pipe.ref.spec, "a hat", init_size=last.size, steps=1, seed=1)
    assert (request.width, request.height) == (1024, 1024)  # ~1 MP at the last image's aspect
    small, _ = qimg.make_request(pipe.ref.spec, "a hat", steps=1, seed=1, width=48, height=32)
    out = pipe.edit(request=small, images=[first, last], keep_size=True)[0]
    assert out.size == first.size and out.info["qimg"]["keep_size"] is True
    assert pipe.edit(request=small, images=[first, last])[0].size == (48, 32)


def test_models_refuse_the_other_task(tiny_qwen_edit_pipe_and_dir, tiny_qwen):
    edit = qimg.load(tiny_qwen_edit_pipe_and_dir[1], device="cpu")
    with pytest.raises(InputError, match="is an edit model"):
        edit.generate("a cat", steps=1, width=32, height=32)
    with pytest.raises(InputError, match="takes 1 to at most 1 input images, got 2"):
        edit.edit("a cat", [_picture(32, 32, 0)] * 2, steps=1, width=32, height=32)
    t2i = qimg.load(tiny_qwen, device="cpu")
    with pytest.raises(InputError, match="is a text-to-image model"):
        t2i.edit("a cat", [_picture(32, 32, 0)], steps=1)


def test_saved_edit_embeddings_need_the_same_images(tiny_qwen_edit_pipe_and_dir, tmp_path):
    _, folder = tiny_qwen_edit_pipe_and_dir
    pipe = qimg.load(folder, device="cpu")
    image = _picture(80, 60, 6)
    request, _ = qimg.make_request(pipe.ref.spec, "a hat", steps=1, seed=2, width=32, height=32)
    path = qimg.save_embeddings(tmp_path / "e.safetensors", pipe.encode_prompts(request, images=[image]))
    direct = np.asarray(pipe.edit(request=request, images=[image])[0])
    fresh = qimg.load(folder, device="cpu")
    from_file = np.asarray(fresh.edit(request=request, images=[image], embeddings=qimg.load_embeddings(path))[0])
    assert np.array_equal(direct, from_file) and not fresh.text_encoder_loaded
    with pytest.raises(InputError, match="other input images"):
        fresh.edit(request=request, images=[_picture(80, 60, 7)], embeddings=qimg.load_embeddings(path))
