"""The runtime features on FLUX.1 (tiny random weights, CPU): FP8 storage of the right linears (the denoiser's and
T5's), both block lists streamed from host memory giving the resident output, tiled VAE, saved prompt embeddings
(encode-prompt, then --prompt-embeds) and their refusal across families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.families.flux import BLOCKS
from qimg.nets.flux import flux_ids, flux_rope
from qimg.runtime.fp8 import FP8Linear
from qimg.runtime.offload import Offloaded
from tests.fixtures_flux_model import write_tiny_flux

PROMPT = "a lighthouse on a cliff at dusk"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-flux-runtime") / "model"
    write_tiny_flux(root, seed=3)
    return root


def test_fp8_weights_cover_the_block_matmuls_and_t5_and_keep_the_rest(flux):
    pipe = qimg.load(flux, device="cpu", dtype="float32", fp8="weights")
    kinds = {name: type(m) for name, m in pipe.transformer.named_modules() if isinstance(m, (nn.Linear, FP8Linear))}
    assert kinds["transformer_blocks.0.attn.to_q"] is FP8Linear
    assert kinds["transformer_blocks.1.ff_context.net.2"] is FP8Linear
    assert kinds["single_transformer_blocks.1.proj_out"] is FP8Linear
    for kept in ("transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear", "x_embedder",
                 "context_embedder", "proj_out", "norm_out.linear", "time_text_embed.guidance_embedder.linear_1"):
        assert kinds[kept] is nn.Linear, kept
    full = qimg.load(flux, device="cpu", dtype="float32")
    options = dict(seed=2, steps=2, width=48, height=32)
    a, b = (np.asarray(p.generate(PROMPT, **options)[0]).astype(np.int16) for p in (pipe, full))
    # e4m3 weights (3 mantissa bits) on a random tiny net: the same picture, not the same bits.
    assert a.shape == b.shape and np.abs(a - b).mean() < 24
    t5 = pipe.prompts.model["text_encoder_2"]
    assert isinstance(t5.encoder.block[0].layer[0].SelfAttention.q, FP8Linear)


def test_both_block_lists_stream_to_the_resident_output(flux):
    pipe = qimg.load(flux, device="cpu", dtype="float32")
    model = pipe.transformer
    p = model.params
    gen = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 12, 64, generator=gen), torch.randn(1, 7, p.joint_attention_dim, generator=gen)
    pooled, t, g = torch.randn(1, p.pooled_projection_dim, generator=gen), torch.tensor([0.6]), torch.tensor([3.5])
    rope = flux_rope(flux_ids(7, [(0, 3, 4)]), p.axes_dims_rope, p.rope_theta)
    with torch.inference_mode():
        want = model(x, txt, t, g, pooled, rope)
        blocks = BLOCKS.modules(model)
        assert len(blocks) == p.num_layers + p.num_single_layers
        off = Offloaded(model, torch.device("cpu"), blocks, slots=2)
        off.log.enabled = True
        off.stream([0, 2, 3])  # a double block and both single blocks
        off.to_device()
        got = model(x, txt, t, g, pooled, rope)
    assert torch.equal(got, want)
    assert [b for what, b, _ in off.log.events if what == "run"] == [0, 2, 3]


def test_tiled_vae_decodes_the_same_picture(flux):
    plain = qimg.load(flux, device="cpu", dtype="float32")
    tiled = qimg.load(flux, device="cpu", dtype="float32", vae_tiling=qimg.Tiling(32, 16))
    options = dict(seed=5, steps=2, width=96, height=64)
    a, b = (np.asarray(p.generate(PROMPT, **options)[0]).astype(np.int16) for p in (plain, tiled))
    # GroupNorm statistics differ per tile (tests/nets/test_flux_vae.py measures how much against diffusers' own
    # tiling): the same picture within a loose bound, not the same bits.
    assert a.shape == b.shape == (64, 96, 3) and np.abs(a - b).mean() < 40


def test_saved_prompt_embeddings_give_the_same_image_and_stay_in_their_family(flux, tiny_qwen, tmp_path):
    runner = CliRunner()
    embeds = tmp_path / "p.safetensors"
    done = runner.invoke(app, ["encode-prompt", PROMPT, "-o", str(embeds), "--model", str(flux), "--device", "cpu",
                               "--dtype", "float32"])
    assert done.exit_code == 0, done.output
    common = ["--model", str(flux), "--seed", "3", "--steps", "2", "--width", "32", "--height", "32", "--device",
              "cpu", "--dtype", "float32"]
    direct, saved = tmp_path / "direct.png", tmp_path / "saved.png"
    assert runner.invoke(app, ["generate", PROMPT, "-o", str(direct), *common]).exit_code == 0
    done = runner.invoke(app, ["generate", "--prompt-embeds", str(embeds), "-o", str(saved), *common])
    assert done.exit_code == 0, done.output
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(direct)), np.asarray(Image.open(saved)))
    wrong = runner.invoke(app, ["generate", "--prompt-embeds", str(embeds), "-o", str(tmp_path / "q.png"),
                                "--model", str(tiny_qwen), "--device", "cpu", "--steps", "1"])
    assert wrong.exit_code != 0 and "Traceback" not in wrong.output and not (tmp_path / "q.png").exists()
    error = next(line for line in wrong.stderr.splitlines() if line.startswith("error:"))
    assert "flux" in error and "qwen-image" in error, error


def test_a_single_file_transformer_in_the_diffusers_layout_gives_the_same_image(flux, tmp_path):
    from safetensors.torch import load_file, save_file

    single = tmp_path / "flux-transformer.safetensors"
    tensors = {}
    for part in sorted((flux / "transformer").glob("*.safetensors")):
        tensors.update(load_file(str(part)))
    save_file(tensors, str(single))
    options = dict(seed=1, steps=2, width=32, height=32)
    plain = qimg.load(flux, device="cpu", dtype="float32").generate(PROMPT, **options)[0]
    pipe = qimg.load(flux, device="cpu", dtype="float32", transformer=single)
    assert pipe.transformer_file is not None
    assert np.array_equal(np.asarray(pipe.generate(PROMPT, **options)[0]), np.asarray(plain))
