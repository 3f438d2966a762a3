"""FluxVAE against diffusers' AutoencoderKL (FLUX.1 layout: 16 latent channels, no quant convs) on tiny random
weights, loaded strictly from a save_pretrained folder; tiled encode/decode through qimg.runtime.tiling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qimg.errors import CheckpointError, ConfigError
from qimg.loading.checkpoint import params_from_config
from qimg.loading.flux_vae import FLUX_VAE_CONFIG, FLUX_VAE_CONFIG_IGNORED, flux_vae_params, load_flux_vae
from qimg.nets.flux_vae import FluxVAE
from qimg.runtime.tiling import Tiling, decode_tiled, encode_tiled
from qimg.specs import FluxVAEParams
from tests.fixtures import randomize_

WEIGHTS = "diffusion_pytorch_model.safetensors"
BLOCKS = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
# FLUX.1-dev vae/config.json, less the keys that only matter to diffusers.
FLUX_CONFIG = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
                   norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                   use_post_quant_conv=False, mid_block_add_attention=True, **BLOCKS)
TINY = dict(FLUX_CONFIG, block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4)
# fp32 on CPU, same ops in the same order as diffusers: measured bit-identical (max |diff| 0) for encode (mean,
# logvar) and decode. 2e-5 of the output scale leaves room for another CPU/BLAS picking other kernels, as the
# Qwen VAE test allows, without hiding a real bug (a wrong pad, norm or residual gives O(1)).
RTOL = 2e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A tiny FLUX-layout AutoencoderKL with every parameter random, saved as diffusers saves it."""
    from diffusers import AutoencoderKL

    ref = randomize_(AutoencoderKL(**TINY), seed=0).eval()
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    return folder, ref


@pytest.fixture(scope="module")
def ours(tiny_vae_dir: tuple[Path, nn.Module]) -> FluxVAE:
    return load_flux_vae(tiny_vae_dir[0], device="cpu", dtype=torch.float32)


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= RTOL * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


def test_config_is_read(ours: FluxVAE) -> None:
    assert ours.params == FluxVAEParams(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    assert ours.scale_factor == 8 and FluxVAEParams().scale_factor == 8
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training


@pytest.mark.parametrize("config", [FLUX_CONFIG, dict(TINY, mid_block_add_attention=False, layers_per_block=2)],
                         ids=["flux-dev", "tiny-no-attention"])
def test_key_layout_matches_diffusers(config: dict) -> None:
    """Same tensor names and shapes as AutoencoderKL (no quant_conv keys), for the released config and for a
    tiny one without mid-block attention."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ref = AutoencoderKL(**config).state_dict()
        net = FluxVAE(params_from_config(FluxVAEParams, config, FLUX_VAE_CONFIG, FLUX_VAE_CONFIG_IGNORED))
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: tuple(v.shape) for k, v in ref.items()}
    if config is FLUX_CONFIG:  # 83,819,683 parameters in 244 tensors, as the released vae/ file
        assert sum(v.numel() for v in ref.values()) == 83_819_683 and len(ref) == 244


@pytest.mark.parity
@pytest.mark.parametrize("size", [(64, 48), (40, 56), (36, 44)])  # 36x44: off the 8 px grid, as diffusers allows
@torch.no_grad()
def test_encode_matches_diffusers(tiny_vae_dir: tuple[Path, nn.Module], ours: FluxVAE, size: tuple[int, int]):
    ref = tiny_vae_dir[1]
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == logvar.shape == dist.mean.shape and mean.shape[:2] == (2, 16)
    _assert_close(mean, dist.mean)
    _assert_close(logvar, dist.logvar)


@torch.no_grad()
def test_logvar_is_clamped_as_diffusers(ours: FluxVAE) -> None:
    """DiagonalGaussianDistribution clamps logvar to [-30, 20]; the mean is left alone."""
    big = FluxVAE(ours.params).eval()
    big.load_state_dict(ours.state_dict())
    big.encoder.conv_out.bias.data[16:] = 1e3  # every logvar far above 20
    big.encoder.conv_out.bias.data[16:20] = -1e3  # and some far below -30
    _, logvar = big.encode(torch.zeros(1, 3, 16, 16))
    assert (logvar[:, :4] == -30).all() and (logvar[:, 4:] == 20).all()


@pytest.mark.parity
@pytest.mark.parametrize("size", [(6, 8), (5, 7)])
@torch.no_grad()
def test_decode_matches_diffusers(tiny_vae_dir: tuple[Path, nn.Module], ours: FluxVAE, size: tuple[int, int]):
    ref = tiny_vae_dir[1]
    z = torch.randn(2, 16, *size, generator=torch.Generator().manual_seed(2))
    expected = ref.decode(z).sample
    assert expected.shape == (2, 3, size[0] * 8, size[1] * 8)
    _assert_close(ours.decode_unclamped(z), expected)
    # decode clamps as the pipelines' postprocess does ((x / 2 + 0.5).clamp(0, 1)); both kinds of pixel occur.
    assert (expected.abs() > 1).any() and (expected.abs() < 0.99).float().mean() > 0.5
    _assert_close(ours.decode(z), expected.clamp(-1.0, 1.0))
    assert ours.decode(z).abs().max() <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_normalisation_matches_pipelines(tiny_vae_dir: tuple[Path, nn.Module], ours: FluxVAE,
                                                dtype: torch.dtype) -> None:
    cfg = tiny_vae_dir[1].config
    z = (torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    # pipeline_flux*.py: (latents - shift) * scaling after encoding, latents / scaling + shift before decoding.
    assert torch.equal(ours.normalize(z), (z - cfg.shift_factor) * cfg.scaling_factor)
    assert torch.equal(ours.normalize(z, reciprocal=True), ours.normalize(z))  # no second rounding in FLUX
    assert torch.equal(ours.denormalize(z), z / cfg.scaling_factor + cfg.shift_factor)
    if dtype == torch.float32:
        torch.testing.assert_close(ours.normalize(ours.denormalize(z)), z, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- tiling

H, W = 128, 160


@pytest.fixture(scope="module")
def photo() -> Tensor:
    """skimage's astronaut, downscaled to 160x128, as (1, 3, H, W) in [-1, 1] (as tests/runtime/test_tiling.py)."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((W, H), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def untiled(ours: FluxVAE, photo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    with torch.no_grad():
        mean, logvar = ours.encode(photo)
        return mean, logvar, ours.decode(mean)


@torch.no_grad()
def test_an_image_that_fits_one_tile_is_untiled_bit_for_bit(ours: FluxVAE, photo: Tensor, untiled) -> None:
    mean, logvar, image = untiled
    got_mean, got_logvar = encode_tiled(ours, photo, Tiling(160, 32))
    assert torch.equal(got_mean, mean) and torch.equal(got_logvar, logvar)
    assert torch.equal(decode_tiled(ours, mean, Tiling(160, 32)), image)


# Unlike the Qwen VAE (RMS norm per pixel), this VAE's GroupNorms take statistics over the whole tile, so every
# norm in a tile sees other statistics than over the whole image, and tiled output moves away from untiled far
# more than the Qwen tiling tests allow for small tiles (measured: |diff| 0.27 mean for 64 px tiles on this
# 128x160 photo). diffusers' own tiled AutoencoderKL has the same property and, with its linear blend, moves as
# far or further at the same tile and overlap (measured: ours / diffusers' mean |diff| = 0.98 decode, 0.94
# encode at 64 px; 0.42 and 0.42 at 128 px). So the checks are: no further from untiled than diffusers' tiling
# (x1.25 for headroom), and, for a tile spanning most of the image, within the Qwen tests' mean bounds
# (DECODE_MEAN 0.05, ENCODE_MEAN 0.1; measured 0.042 and 0.048). Max bounds are ours: measured 0.44 / 0.34.
QWEN_DECODE_MEAN, QWEN_ENCODE_MEAN = 0.05, 0.1
LARGE_TILE_DECODE_MAX, LARGE_TILE_ENCODE_MAX = 0.6, 0.5
VS_DIFFUSERS = 1.25


@pytest.mark.parity
@pytest.mark.parametrize("tiling", [Tiling(64, 16), Tiling(128, 32)], ids=str)
@torch.no_grad()
def test_tiled_stays_as_close_to_untiled_as_diffusers_tiling(tiny_vae_dir, ours, photo, untiled, tiling) -> None:
    ref = tiny_vae_dir[1]
    mean, _, image = untiled
    got = decode_tiled(ours, mean, tiling)
    assert got.shape == image.shape and got.abs().max() <= 1.0
    dec = (got - image).abs()
    enc = (encode_tiled(ours, photo, tiling)[0] - mean).abs()

    ref.enable_tiling()  # diffusers' tiles: sample_size px, latent tiles of sample_size / 8, overlap factor
    ref.tile_sample_min_size, ref.tile_latent_min_size = tiling.tile, tiling.tile // 8
    ref.tile_overlap_factor = tiling.overlap / tiling.tile
    try:
        ref_dec = (ref.decode(mean).sample.clamp(-1.0, 1.0) - image).abs()
        ref_enc = (ref.encode(photo).latent_dist.mean - mean).abs()
    finally:
        ref.disable_tiling()
    assert dec.mean() <= VS_DIFFUSERS * ref_dec.mean(), (dec.mean().item(), ref_dec.mean().item())
    assert enc.mean() <= VS_DIFFUSERS * ref_enc.mean(), (enc.mean().item(), ref_enc.mean().item())
    if tiling.tile == 128:
        assert dec.mean() <= QWEN_DECODE_MEAN and dec.max() <= LARGE_TILE_DECODE_MAX, (dec.mean(), dec.max())
        assert enc.mean() <= QWEN_ENCODE_MEAN and enc.max() <= LARGE_TILE_ENCODE_MAX, (enc.mean(), enc.max())


# ----------------------------------------------------------------------------------------------- strict loading


def _copy_with(src: Path, dst: Path, edit_state=None, edit_config=None) -> Path:
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    if edit_state:
        state = load_file(str(src / WEIGHTS))
        edit_state(state)
        save_file(state, str(dst / WEIGHTS))
    else:
        shutil.copy(src / WEIGHTS, dst / WEIGHTS)
    return dst


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and error.value.hint
    return text


@pytest.mark.parametrize(
    "edit,words,key",
    [
        (lambda s: s.pop("decoder.mid_block.attentions.0.to_k.weight"), "missing",
         "decoder.mid_block.attentions.0.to_k.weight"),
        (lambda s: s.update({"quant_conv.weight": torch.zeros(32, 32, 1, 1)}), "unexpected", "quant_conv.weight"),
        (lambda s: s.update({"encoder.conv_norm_out.weight": torch.ones(8)}), "wrong shape",
         "encoder.conv_norm_out.weight"),
    ],
    ids=["missing", "unexpected", "misshapen"],
)
def test_checkpoint_mismatch_is_one_line(tiny_vae_dir, tmp_path: Path, edit, words: str, key: str) -> None:
    folder = _copy_with(tiny_vae_dir[0], tmp_path / "vae", edit_state=edit)
    with pytest.raises(CheckpointError, match=words) as info:
        load_flux_vae(folder, device="cpu", dtype=torch.float32)
    assert key in _one_line(info)


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda c: c.update(use_quant_conv=True), "use_quant_conv"),
        (lambda c: c.update(use_post_quant_conv=True), "use_post_quant_conv"),
        (lambda c: c.pop("use_quant_conv"), "use_quant_conv"),  # absent: diffusers builds it
        (lambda c: c.update(act_fn="gelu"), "act_fn"),
        (lambda c: c["down_block_types"].__setitem__(1, "AttnDownEncoderBlock2D"), "down_block_types"),
        (lambda c: c.update(up_block_types=["UpDecoderBlock2D"] * 3), "up_block_types"),
        (lambda c: c.update(norm_num_groups=3), "norm_num_groups"),
        (lambda c: c.pop("shift_factor"), "shift_factor"),
        (lambda c: c.update(use_fancy_norm=True), "use_fancy_norm"),
    ],
    ids=["quant", "post-quant", "quant-absent", "act", "down-type", "up-count", "groups", "no-shift", "unknown"],
)
def test_unsupported_config_is_one_line(tiny_vae_dir, tmp_path: Path, edit, words: str) -> None:
    folder = _copy_with(tiny_vae_dir[0], tmp_path / "vae", edit_config=edit)
    with pytest.raises(ConfigError) as info:
        flux_vae_params(folder)
    assert words in _one_line(info)
