"""General request and conditioning types: distilled guidance on the request, a pooled vector in prompt
embeddings (and their file), latent normalisation as a method of the VAE."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qimg
from qimg.embeddings import EmbeddingsFile, PromptEmbeds, load_embeddings, save_embeddings
from qimg.nets.qwen_vae import QwenVAE, denormalize_latents, normalize_latents
from qimg.specs import SPECS, QwenVAEParams


def test_guidance_is_refused_for_a_family_without_it_and_bounded_for_one_with_it():
    spec = SPECS["qwen-image"]
    request, _ = qimg.make_request(spec, "a fox")
    assert request.guidance is None and "guidance" in request.as_dict()
    with pytest.raises(qimg.QimgError, match="has no distilled guidance"):
        qimg.make_request(spec, "a fox", guidance=3.5)
    distilled = dataclasses.replace(spec, guidance=3.5)
    assert qimg.make_request(distilled, "a fox")[0].guidance == 3.5
    assert qimg.make_request(distilled, "a fox", guidance=1.0)[0].guidance == 1.0
    for bad in (-1.0, float("inf"), 1e9):
        with pytest.raises(qimg.QimgError, match="--guidance must be between"):
            qimg.make_request(distilled, "a fox", guidance=bad)


def test_pooled_prompt_vectors_round_trip_through_the_embeddings_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    cond = PromptEmbeds(torch.randn(1, 4, 8, generator=gen), None, torch.randn(1, 6, generator=gen))
    uncond = PromptEmbeds(torch.randn(1, 3, 8, generator=gen))
    path = save_embeddings(tmp_path / "e.safetensors", EmbeddingsFile(cond, uncond, {"family": "flux"}))
    back = load_embeddings(path)
    assert torch.equal(back.cond.pooled, cond.pooled) and back.uncond.pooled is None
    assert torch.equal(back.cond.embeds, cond.embeds) and back.meta["family"] == "flux"
    assert back.cond.to("cpu", torch.float64).pooled.dtype == torch.float64


def test_vae_normalisation_methods_equal_the_functions():
    params = QwenVAEParams(base_dim=8, z_dim=16, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(False,))
    with torch.device("meta"):
        vae = QwenVAE(params)
    z = torch.randn(1, 16, 4, 4, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(vae.normalize(z), normalize_latents(z, params))
    assert torch.equal(vae.normalize(z, reciprocal=True), normalize_latents(z, params, reciprocal=True))
    assert torch.equal(vae.denormalize(z), denormalize_latents(z, params))
