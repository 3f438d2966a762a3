"""End-to-end parity: qimg's Qwen-Image pipeline vs diffusers' QwenImagePipeline on the same tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qimg
from qimg.loading.components import load_text_encoder, load_tokenizer, load_tokenizer_file
from qimg.nets.text_encoders import QWEN_IMAGE_T2I, encode_qwen_prompt
from qimg.pipelines import run_qwen

pytestmark = pytest.mark.parity

PROMPTS = {
    "english": "A red fox sitting in fresh snow, golden hour, 35mm photo",
    "chinese": "精致肖像，水下少女，蓝裙飘逸，发丝轻扬，光影透澈",
}


@pytest.fixture(scope="module")
def ours(tiny_qwen):
    return qimg.load(tiny_qwen, device="cpu", dtype="float32")


@pytest.mark.parametrize("own", [True, False], ids=["qimg-lm", "transformers"])
@pytest.mark.parametrize("which", sorted(PROMPTS))
def test_prompt_embeddings_and_mask_match_diffusers(tiny_qwen_pipe_and_dir, which, own):
    """Text-to-image prompts go through qimg's language model and the tokenizer.json alone; transformers' model
    and tokenizer (edit models' path) give the same embeddings."""
    ref, folder = tiny_qwen_pipe_and_dir
    encoder = load_text_encoder(folder / "text_encoder", device="cpu", dtype=torch.float32, vision=not own,
                                head=False)
    tokenizer = (load_tokenizer_file if own else load_tokenizer)(folder / "tokenizer")
    got, got_mask = encode_qwen_prompt(encoder, tokenizer, PROMPTS[which], QWEN_IMAGE_T2I, 512)
    with torch.no_grad():
        want, want_mask = ref._get_qwen_prompt_embeds(PROMPTS[which], device="cpu")
    assert got.shape == want.shape
    # Same weights, same tokens, same transformers code path (minus the LM head): identical up to fp32 rounding.
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_mask, want_mask)


def test_max_sequence_length_truncates_the_kept_tokens(tiny_qwen_pipe_and_dir):
    ref, folder = tiny_qwen_pipe_and_dir
    encoder = load_text_encoder(folder / "text_encoder", device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(folder / "tokenizer")
    long_prompt = " ".join(["a very long prompt"] * 40)
    got, _ = encode_qwen_prompt(encoder, tokenizer, long_prompt, QWEN_IMAGE_T2I, 16)
    with torch.no_grad():
        want, _ = ref.encode_prompt(long_prompt, device="cpu", max_sequence_length=16)
    assert got.shape[1] == 16
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("seed,size", [(0, (64, 48)), (1234, (48, 80))], ids=["64x48", "48x80"])
def test_whole_pipeline_matches_diffusers(tiny_qwen_pipe_and_dir, ours, cfg, seed, size):
    ref, _ = tiny_qwen_pipe_and_dir
    width, height = size
    prompt = PROMPTS["english"]
    call = dict(prompt=prompt, negative_prompt=" ", true_cfg_scale=cfg, num_inference_steps=3, width=width,
                height=height)
    with torch.no_grad():
        want_latents = ref(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
        want_img = ref(**call, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    request, _ = qimg.make_request(ours.ref.spec, prompt, negative=" ", cfg=cfg, steps=3, width=width, height=height,
                                   seed=seed)
    assert request.cfg_enabled == (cfg > 1)
    with torch.inference_mode():
        data = ours.encode_prompts(request, with_negative=request.cfg_enabled)
        latents = run_qwen(ours, request, data.cond, data.uncond)
    # fp32 throughout; the differences are summation-order rounding accumulated over 3 steps.
    assert torch.allclose(latents, want_latents, rtol=1e-4, atol=1e-4)
    image = np.asarray(ours.generate(request=request)[0])
    assert image.shape == (height, width, 3)
    want = np.round(want_img * 255).astype(np.int16)
    # uint8 images: a value within rounding distance of .5 may land one level apart.
    assert np.abs(image.astype(np.int16) - want).max() <= 1


def test_same_seed_same_image_and_metadata(ours):
    a = ours.generate("a cat", seed=7, steps=2, width=32, height=32)[0]
    b = ours.generate("a cat", seed=7, steps=2, width=32, height=32)[0]
    c = ours.generate("a cat", seed=8, steps=2, width=32, height=32)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    params = a.info["qimg"]
    assert params["seed"] == 7 and params["steps"] == 2 and params["prompt"] == "a cat"
    assert params["negative"] == " " and params["cfg"] == 4.0 and params["cfg_enabled"] is True
    assert params["dtype"] == "float32" and params["qimg_version"] == qimg.__version__


def _photo(width: int, height: int, seed: int = 0):
    """A smooth synthetic RGB picture (gradients + a disc), so resizing and the VAE see structure, not noise."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    img = np.stack([xx, yy, ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.08).astype(float)], -1)
    img = 0.8 * img + 0.2 * rng.random((height, width, 3))
    return Image.fromarray((img * 255).astype(np.uint8))


@pytest.mark.slow
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(tiny_qwen_pipe_and_dir, ours, strength):
    from diffusers import QwenImageImg2ImgPipeline

    ref = QwenImageImg2ImgPipeline(**tiny_qwen_pipe_and_dir[0].components)
    init = _photo(80, 56)  # resized to the requested 64x48 by both sides (Lanczos)
    call = dict(prompt=PROMPTS["english"], negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=4,
                width=64, height=48, strength=strength)
    with torch.no_grad():
        want = ref(image=init, **call, generator=torch.Generator("cpu").manual_seed(5), output_type="latent").images
    request, _ = qimg.make_request(ours.ref.spec, PROMPTS["english"], negative=" ", cfg=4.0, steps=4, width=64,
                                   height=48, seed=5, strength=strength)
    with torch.inference_mode():
        data = ours.encode_prompts(request)
        got = run_qwen(ours, request, data.cond, data.uncond, init_image=init)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_inpainting_matches_diffusers(tiny_qwen_pipe_and_dir, ours):
    from diffusers import QwenImageInpaintPipeline
    from PIL import Image

    ref = QwenImageInpaintPipeline(**tiny_qwen_pipe_and_dir[0].components)
    init = _photo(64, 48, seed=1)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:40, 20:50] = 255  # white = repaint
    mask = Image.fromarray(mask)
    call = dict(prompt=PROMPTS["english"], negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=4,
                width=64, height=48, strength=0.8)
    with torch.no_grad():
        want = ref(image=init, mask_image=mask, **call, generator=torch.Generator("cpu").manual_seed(9),
                   output_type="latent").images
    request, _ = qimg.make_request(ours.ref.spec, PROMPTS["english"], negative=" ", cfg=4.0, steps=4, width=64,
                                   height=48, seed=9, strength=0.8)
    with torch.inference_mode():
        data = ours.encode_prompts(request)
        got = run_qwen(ours, request, data.cond, data.uncond, init_image=init, mask=mask)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    # Outside the mask the result is the init image's latents exactly (pasted back at the last step).
    assert not torch.allclose(got, run_qwen(ours, request, data.cond, data.uncond, init_image=init), atol=1e-3)


def test_saved_prompt_embeddings_give_the_same_image_without_the_text_encoder(tiny_qwen, tmp_path):
    from qimg.embeddings import load_embeddings, save_embeddings

    first = qimg.load(tiny_qwen, device="cpu")
    request, _ = qimg.make_request(first.ref.spec, "a lighthouse", seed=3, steps=2, width=32, height=32)
    path = save_embeddings(tmp_path / "emb.safetensors", first.encode_prompts(request))
    from_prompt = np.asarray(first.generate(request=request)[0])

    fresh = qimg.load(tiny_qwen, device="cpu")
    data = load_embeddings(path)
    assert data.meta["prompt"] == "a lighthouse" and data.meta["family"] == "qwen-image"
    from_file = np.asarray(fresh.generate(request=request, embeddings=data)[0])
    assert np.array_equal(from_prompt, from_file)
    # Without a request the prompts come from the file; the other options as keywords.
    short = fresh.generate(embeddings=data, seed=3, steps=2, width=32, height=32)[0]
    assert np.array_equal(np.asarray(short), from_file) and short.info["qimg"]["prompt"] == "a lighthouse"
    assert not fresh.text_encoder_loaded


def test_embeddings_for_another_family_are_refused(tiny_qwen, tmp_path):
    from qimg.embeddings import load_embeddings, save_embeddings
    from qimg.errors import InputError

    pipe = qimg.load(tiny_qwen, device="cpu")
    request, _ = qimg.make_request(pipe.ref.spec, "a lighthouse", seed=3, steps=2, width=32, height=32)
    data = pipe.encode_prompts(request)
    data.meta["family"] = "flux"
    path = save_embeddings(tmp_path / "emb.safetensors", data)
    with pytest.raises(InputError, match="made for flux"):
        pipe.generate(request=request, embeddings=load_embeddings(path))


def test_text_side_loaded_beside_the_denoiser_gives_the_same_image(tiny_qwen, ours, monkeypatch):
    # On a GPU with everything resident the tokenizer and the text encoder load on a thread while the denoiser
    # loads; forced here on the CPU, the real tokenizer and encoder go through that path.
    from qimg.pipelines import base

    monkeypatch.setattr(base, "text_beside_denoiser", lambda plan, device: True)
    beside = qimg.load(tiny_qwen, device="cpu", dtype="float32")
    assert beside.prompts._loader is not None  # loaded on the worker
    a = beside.generate("a cat", seed=7, steps=2, width=32, height=32)[0]
    b = ours.generate("a cat", seed=7, steps=2, width=32, height=32)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
