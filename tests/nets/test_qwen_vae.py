"""QwenVAE (2-D single-image net) against diffusers' 3-D AutoencoderKLQwenImage on the same tiny weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qimg.errors import CheckpointError
from qimg.loading.checkpoint import params_from_config
from qimg.loading.components import load_qwen_vae
from qimg.loading.keymaps import QWEN_VAE_CONFIG, qwen_vae_tensor
from qimg.nets.qwen_vae import QwenVAE, denormalize_latents, normalize_latents
from qimg.specs import QwenVAEParams
from tests.fixtures import randomize_

WEIGHTS = "diffusion_pytorch_model.safetensors"
# fp32 on CPU: the only difference from diffusers is the summation order of conv2d vs conv3d over zero-padded
# frames (and of SDPA), so errors sit at fp32 rounding: measured <= 1.6e-6 of the output scale through ~25
# layers. 2e-5 leaves 10x headroom for other CPUs/BLAS without hiding a real bug (a wrong slice gives O(1)).
RTOL = 2e-5


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """The offline_fixtures.md tiny VAE with every parameter random, saved in the official layout."""
    from diffusers import AutoencoderKLQwenImage

    ref = AutoencoderKLQwenImage(
        base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    )
    randomize_(ref, seed=0).eval()
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    return folder, ref


@pytest.fixture(scope="module")
def ours(tiny_vae_dir: tuple[Path, nn.Module]) -> QwenVAE:
    return load_qwen_vae(tiny_vae_dir[0], device="cpu", dtype=torch.float32)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= RTOL * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


def test_config_is_read(ours: QwenVAE) -> None:
    assert ours.params == QwenVAEParams(base_dim=16, num_res_blocks=1)
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parity
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
@torch.no_grad()
def test_encode_matches_diffusers(tiny_vae_dir: tuple[Path, nn.Module], ours: QwenVAE, size: tuple[int, int]):
    ref = tiny_vae_dir[1]
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dist = ref.encode(x[:, :, None]).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == (2, 16, size[0] // 8, size[1] // 8)
    _assert_close(mean, dist.mean[:, :, 0])
    _assert_close(logvar, dist.logvar[:, :, 0])


@pytest.mark.parity
@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
@torch.no_grad()
def test_decode_matches_diffusers(tiny_vae_dir: tuple[Path, nn.Module], ours: QwenVAE, size: tuple[int, int]):
    ref = tiny_vae_dir[1]
    z = torch.randn(2, 16, *size, generator=torch.Generator().manual_seed(2))
    expected = ref.decode(z[:, :, None]).sample[:, :, 0]
    out = ours.decode(z)
    assert out.shape == (2, 3, size[0] * 8, size[1] * 8)
    # The comparison must cover both clamped pixels (the clamp is part of decode) and free ones.
    assert (expected.abs() == 1).any() and (expected.abs() < 0.99).float().mean() > 0.5
    _assert_close(out, expected)



@pytest.mark.parametrize(
    "config",
    [
        {},
        dict(base_dim=16, num_res_blocks=1, attn_scales=[1.0, 0.25], temperal_downsample=[True, False, True]),
    ],
    ids=["released", "tiny-with-attention"],
)
def test_key_layout_matches_diffusers(config: dict) -> None:
    """Every official tensor but the time convs has a same-named, same-shaped (after the 3-D -> 2-D transform)
    tensor in our net, for the released config and for one that puts attention into the encoder stages."""
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        ref = AutoencoderKLQwenImage(**config).state_dict()
        ours = QwenVAE(params_from_config(QwenVAEParams, config, QWEN_VAE_CONFIG)).state_dict()
    want = {k: tuple(qwen_vae_tensor(k, v).shape) for k, v in ref.items() if ".time_conv." not in k}
    assert {k: tuple(v.shape) for k, v in ours.items()} == want

@pytest.mark.parity
def test_rms_norm_bf16_bit_exact() -> None:
    """The fp32-inside normalisation for half inputs rounds exactly as diffusers' QwenImageRMS_norm."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageRMS_norm

    from qimg.nets.qwen_vae import ChannelRMSNorm

    ref, norm = QwenImageRMS_norm(24, images=True), ChannelRMSNorm(24)
    randomize_(ref, seed=3)
    norm.gamma.data.copy_(ref.gamma.data)
    ref, norm = ref.to(torch.bfloat16), norm.to(torch.bfloat16)
    x = torch.randn(2, 24, 5, 7, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    assert torch.equal(norm(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_normalisation_matches_pipelines(dtype: torch.dtype) -> None:
    p = QwenVAEParams()
    z = (torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    mean = torch.tensor(p.latents_mean).view(1, 16, 1, 1).to(dtype)
    std = torch.tensor(p.latents_std).view(1, 16, 1, 1).to(dtype)
    # pipeline_qwenimage*.py before vae.decode: latents / (1 / std) + mean, stats cast before the reciprocal.
    assert torch.equal(denormalize_latents(z, p), z / (1.0 / std) + mean)
    # pipeline_qwenimage_edit(_plus).py: plain division; img2img/inpaint: times the reciprocal.
    assert torch.equal(normalize_latents(z, p), (z - mean) / std)
    assert torch.equal(normalize_latents(z, p, reciprocal=True), (z - mean) * (1.0 / std))
    # 5-D (B, C, T, h, w) latents broadcast over the channel axis too.
    assert torch.equal(normalize_latents(z[:, :, None], p)[:, :, 0], normalize_latents(z, p))
    if dtype == torch.float32:
        torch.testing.assert_close(normalize_latents(denormalize_latents(z, p), p), z, rtol=1e-5, atol=1e-5)


def _copy_with(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(str(src / WEIGHTS))
    edit(state)
    save_file(state, str(dst / WEIGHTS))
    return dst


def test_time_convs_load_as_known_unused(tiny_vae_dir: tuple[Path, nn.Module], ours: QwenVAE) -> None:
    keys = load_file(str(tiny_vae_dir[0] / WEIGHTS)).keys()
    time_convs = sorted(k for k in keys if ".time_conv." in k)
    # Two downsample3d in the encoder, two upsample3d in the decoder, weight + bias each: in the file, not in
    # the net, and still the strict load (the `ours` fixture) succeeded.
    assert len(time_convs) == 8, time_convs
    assert not set(time_convs) & set(ours.state_dict())


def test_missing_tensor_is_named(tiny_vae_dir: tuple[Path, nn.Module], tmp_path: Path) -> None:
    key = "decoder.mid_block.attentions.0.to_qkv.weight"
    folder = _copy_with(tiny_vae_dir[0], tmp_path / "vae", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match="missing") as info:
        load_qwen_vae(folder, device="cpu", dtype=torch.float32)
    assert key in str(info.value)


def test_unexpected_tensor_is_named(tiny_vae_dir: tuple[Path, nn.Module], tmp_path: Path) -> None:
    key = "encoder.down_blocks.0.extra.weight"
    folder = _copy_with(tiny_vae_dir[0], tmp_path / "vae", lambda s: s.update({key: torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected") as info:
        load_qwen_vae(folder, device="cpu", dtype=torch.float32)
    assert key in str(info.value)


def test_misshapen_gamma_is_rejected(tiny_vae_dir: tuple[Path, nn.Module], tmp_path: Path) -> None:
    key = "encoder.norm_out.gamma"
    folder = _copy_with(tiny_vae_dir[0], tmp_path / "vae", lambda s: s.update({key: torch.ones(3, 1, 1, 1)}))
    with pytest.raises(CheckpointError, match="wrong shape") as info:
        load_qwen_vae(folder, device="cpu", dtype=torch.float32)
    assert key in str(info.value)


FLASH_MAX_HEAD_DIM = 256  # the largest head dim FlashAttention-2 and -3 kernels take


def _flash_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A stand-in for flash-attn behind the engine's attention switch: refuses head dims it has no kernel for."""
    from qimg.nets import layers

    if q.shape[-1] > FLASH_MAX_HEAD_DIM:
        raise RuntimeError(f"FlashAttention forward only supports head dimension at most 256, got {q.shape[-1]}")
    return layers.sdpa(q, k, v, mask)


@torch.no_grad()
def test_vae_attention_does_not_go_through_the_engine_switch() -> None:
    """The VAE's single head is 384 wide at full size, past flash-attn's 256: with a flash-like kernel installed
    (as --attention flash or auto does), encode and decode still run, bit-identical to plain SDPA."""
    from qimg.nets import layers

    # Mid-block width 8 * 36 = 288: one head wider than 256, at a few million parameters.
    vae = randomize_(QwenVAE(QwenVAEParams(base_dim=8, dim_mult=(1, 1, 1, 36), num_res_blocks=1)), seed=6).eval()
    assert vae.decoder.mid_block.attentions[0].proj.in_channels > FLASH_MAX_HEAD_DIM
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 24, 32, generator=gen) * 2 - 1
    z = torch.randn(1, 16, 3, 4, generator=gen)

    previous = layers.set_attention_impl(layers.sdpa)
    try:
        expected = vae.encode(x)[0], vae.decode(z)
        layers.set_attention_impl(_flash_like)
        got = vae.encode(x)[0], vae.decode(z)
    finally:
        layers.set_attention_impl(previous)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
