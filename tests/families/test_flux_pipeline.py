"""FLUX.1 end to end against diffusers 0.42.1's FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline and
FluxKontextPipeline on tiny random weights (fp32, CPU): the sigmas, whole images for fixed seeds (distilled
guidance, true CFG), img2img and inpainting latents, Kontext editing, and the CLI commands a user runs.

Tolerances: the packed latents within 1e-4 (fp32; the same operations in another order inside attention kernels);
images within one uint8 level (the same latents rounded through the VAE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.pipelines.common import run_flow
from qimg.sampling import flow_sigmas
from tests.fixtures_flux_model import write_tiny_flux

PROMPT = "a photo of a red fox sitting in the snow, golden hour"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flux") / "model"
    return write_tiny_flux(root), root


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flux-kontext") / "model"
    return write_tiny_flux(root, kontext=True, seed=7), root


@pytest.fixture(scope="module")
def ours(flux):
    return qimg.load(flux[1], device="cpu", dtype="float32")


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    img = np.stack([xx, yy, ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.08).astype(float)], -1)
    return Image.fromarray(((0.8 * img + 0.2 * rng.random((height, width, 3))) * 255).astype(np.uint8))


def _close(ours_image: Image.Image, want: np.ndarray) -> None:
    got = np.asarray(ours_image).astype(np.int16)
    assert got.shape == want.shape[:2] + (3,)
    assert np.abs(got - np.round(want * 255).astype(np.int16)).max() <= 1


def test_the_folder_is_recognised_as_flux_dev(flux, ours):
    assert ours.ref.spec.name == "flux-dev" and ours.family.name == "flux"
    assert ours.ref.spec.steps == 28 and ours.ref.spec.guidance == 3.5


@pytest.mark.parametrize("size", [(64, 64), (1024, 1024), (1344, 768)])
def test_sigmas_match_diffusers(flux, ours, size):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    ref = flux[0]
    w, h = size
    tokens = (h // 16) * (w // 16)
    c = ref.scheduler.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(ref.scheduler, 28, sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu)
    assert torch.equal(flow_sigmas(28, ours.schedule, tokens), ref.scheduler.sigmas.float())


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_generate_matches_diffusers(flux, ours, guidance):
    with torch.no_grad():
        want = flux[0](PROMPT, num_inference_steps=3, width=64, height=48, guidance_scale=guidance,
                       generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    _close(ours.generate(PROMPT, seed=3, steps=3, width=64, height=48, guidance=guidance)[0], want)


def test_true_cfg_matches_diffusers(flux, ours):
    with torch.no_grad():
        want = flux[0](PROMPT, negative_prompt="blurry, low quality", true_cfg_scale=3.0, num_inference_steps=3,
                       width=48, height=64, generator=torch.Generator("cpu").manual_seed(4), output_type="np").images[0]
    got = ours.generate(PROMPT, negative="blurry, low quality", cfg=3.0, seed=4, steps=3, width=48, height=64)[0]
    _close(got, want)
    plain = ours.generate(PROMPT, negative="blurry, low quality", cfg=1.0, seed=4, steps=3, width=48, height=64)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(got))  # the negative does something


def _latents(ours, request, init, mask=None):
    with torch.inference_mode():
        data = ours.encode_prompts(request)

        def velocity():
            from qimg.pipelines.flux import flux_velocity

            return flux_velocity(ours.transformer, ours.torch_dtype, data.cond, data.uncond, request.cfg,
                                 request.guidance, [(0, request.height // 16, request.width // 16)])

        return run_flow(ours, request, data.cond.embeds.dtype, velocity, init, mask)


def test_img2img_matches_diffusers(flux, ours):
    from diffusers import FluxImg2ImgPipeline

    ref = FluxImg2ImgPipeline(**flux[0].components)
    init = _photo(80, 56)
    with torch.no_grad():
        # guidance given: FluxImg2ImgPipeline's own default is 7.0, FLUX.1-dev's (qimg's default) 3.5
        want = ref(PROMPT, image=init, strength=0.6, num_inference_steps=4, width=64, height=48, guidance_scale=3.5,
                   generator=torch.Generator("cpu").manual_seed(5), output_type="latent").images
    request, _ = qimg.make_request(ours.ref.spec, PROMPT, steps=4, width=64, height=48, seed=5, strength=0.6)
    assert torch.allclose(_latents(ours, request, init), want, rtol=1e-4, atol=1e-4)


def test_inpainting_matches_diffusers(flux, ours):
    from diffusers import FluxInpaintPipeline

    ref = FluxInpaintPipeline(**flux[0].components)
    init = _photo(64, 48, seed=1)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:40, 20:50] = 255  # white = repaint
    mask = Image.fromarray(mask)
    with torch.no_grad():
        want = ref(PROMPT, image=init, mask_image=mask, strength=0.8, num_inference_steps=4, width=64, height=48,
                   guidance_scale=3.5,
                   generator=torch.Generator("cpu").manual_seed(9), output_type="latent").images
    request, _ = qimg.make_request(ours.ref.spec, PROMPT, steps=4, width=64, height=48, seed=9, strength=0.8)
    assert torch.allclose(_latents(ours, request, init, mask), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(120, 90), (64, 160)])
def test_kontext_edit_matches_diffusers(kontext, size):
    ref, root = kontext
    pipe = qimg.load(root, device="cpu", dtype="float32")
    assert pipe.ref.spec.name == "flux-kontext-dev"
    image = _photo(*size, seed=2)
    with torch.no_grad():
        want = ref(image=image, prompt="make it night", num_inference_steps=2, guidance_scale=2.5,
                   generator=torch.Generator("cpu").manual_seed(6), output_type="np").images[0]
    got = pipe.edit("make it night", [image], seed=6, steps=2, guidance=2.5)[0]
    assert got.size == (1024, 1024)  # Kontext keeps ~1 MP whatever the input's aspect, as diffusers does
    _close(got, want)


def test_cli_generate_and_edit_match_diffusers(flux, kontext, tmp_path):
    runner = CliRunner()
    out = tmp_path / "fox.png"
    done = runner.invoke(app, ["generate", PROMPT, "-o", str(out), "--model", str(flux[1]), "--seed", "11",
                               "--steps", "2", "--guidance", "4.0", "--width", "80", "--height", "48", "--device",
                               "cpu", "--dtype", "float32"])
    assert done.exit_code == 0, done.output
    with torch.no_grad():
        want = flux[0](PROMPT, num_inference_steps=2, guidance_scale=4.0, width=80, height=48,
                       generator=torch.Generator("cpu").manual_seed(11), output_type="np").images[0]
    _close(Image.open(out), want)
    source = tmp_path / "in.png"
    _photo(96, 64, seed=3).save(source)
    edited = tmp_path / "night.png"
    done = runner.invoke(app, ["edit", "make it night", "-i", str(source), "-o", str(edited), "--model",
                               str(kontext[1]), "--seed", "12", "--steps", "2", "--guidance", "2.5", "--device", "cpu",
                               "--dtype", "float32"])
    assert done.exit_code == 0, done.output
    assert "resized to 1248x832" in done.stderr  # 96x64 (aspect 1.5) goes in at the 1.5 training resolution
    with torch.no_grad():
        want = kontext[0](image=Image.open(source), prompt="make it night", num_inference_steps=2, guidance_scale=2.5,
                          generator=torch.Generator("cpu").manual_seed(12), output_type="np").images[0]
    _close(Image.open(edited), want)


def test_guidance_is_refused_for_qwen_and_kontext_sizes_keep_the_area(tiny_qwen, kontext):
    from qimg.errors import InputError

    with pytest.raises(InputError, match="has no distilled guidance"):
        qimg.make_request(qimg.resolve_model(tiny_qwen).spec, "a fox", guidance=2.0)
    spec = qimg.resolve_model(kontext[1]).spec
    request, notes = qimg.make_request(spec, "a fox", width=1024, height=768, init_size=(300, 100))
    # diffusers: w = round(sqrt(1024^2 * 4/3)) = 1182 -> 1168, h = round(sqrt(1024^2 * 3/4)) = 887 -> 880
    assert (request.width, request.height) == (1168, 880) and any("makes 1168x880 images" in n for n in notes)
    request, notes = qimg.make_request(spec, "a fox", init_size=(1024, 1024))
    assert (request.width, request.height) == (1024, 1024) and not notes  # already a training resolution
    # 120x90 floors to 112x80 (aspect 1.40); the nearest training resolution is 1184x880 (1.35), the size
    # diffusers 0.42.1 resizes it to (diffusers_facts.md 6.4).
    _, notes = qimg.make_request(spec, "a fox", init_size=(120, 90))
    assert notes == ["the input image (120x90) is resized to 1184x880, the flux-kontext-dev training resolution "
                     "nearest its aspect"]
