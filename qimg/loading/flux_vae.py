"""Load the FLUX.1 VAE (diffusers AutoencoderKL, vae/ folder) strictly into qimg.nets.flux_vae.FluxVAE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qimg.errors import ConfigError
from qimg.loading.checkpoint import load_module, params_from_config, read_json, safetensors_files
from qimg.nets.flux_vae import FluxVAE
from qimg.specs import FluxVAEParams

# vae/config.json of AutoencoderKL -> FluxVAEParams. State-dict keys need no table: the net uses diffusers' names.
FLUX_VAE_CONFIG = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "latent_channels": "latent_channels",
    "block_out_channels": "block_out_channels",
    "layers_per_block": "layers_per_block",
    "norm_num_groups": "norm_num_groups",
    "scaling_factor": "scaling_factor",
    "shift_factor": "shift_factor",
    "mid_block_add_attention": "mid_block_add_attention",
}
# Keys whose AutoencoderKL default differs from FLUX's: a config without one builds another network in diffusers
# (block_out_channels (64,), latent_channels 4, ...) or another latent space (scaling 0.18215, no shift).
FLUX_VAE_CONFIG_REQUIRED = ("block_out_channels", "layers_per_block", "latent_channels", "down_block_types",
                            "up_block_types")
FLUX_VAE_LATENT_FACTORS = ("scaling_factor", "shift_factor")
# Without effect on the network: sample_size and force_upcast steer diffusers' own tiling and fp32 upcast (the
# FLUX pipelines do not upcast); latents_mean/std are None for FLUX and unused by AutoencoderKL itself. The
# other four are checked by flux_vae_params before they are ignored.
FLUX_VAE_CONFIG_IGNORED = ("sample_size", "force_upcast", "latents_mean", "latents_std", "act_fn",
                           "down_block_types", "up_block_types", "use_quant_conv", "use_post_quant_conv")
_HINT = "qimg runs the FLUX.1 VAE (AutoencoderKL, 16 latent channels); check the model folder"


def _check_variant(config: dict[str, Any], where: str) -> None:
    """Refuse, in one line each, AutoencoderKL variants the net does not build."""
    n = len(config.get("block_out_channels") or ())
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = config.get(key)
        if not isinstance(types, list) or len(types) != n or any(t != block for t in types):
            raise ConfigError(f"{where} has {key} {str(types)[:80]}, not {n} x {block}", hint=_HINT)
    act = config.get("act_fn", "silu")
    if act not in ("silu", "swish"):  # diffusers maps both names to nn.SiLU
        raise ConfigError(f"{where} has act_fn {str(act)[:40]!r}; the FLUX VAE uses silu", hint=_HINT)
    # diffusers' default for both is True: an absent key means the convs exist (older SD-style VAEs).
    on = [key for key in ("use_quant_conv", "use_post_quant_conv") if config.get(key, True)]
    if on:
        raise ConfigError(f"{where} enables {' and '.join(on)} (or leaves it at diffusers' default, on); the FLUX "
                          "VAE has no quant convs", hint=_HINT)


def flux_vae_params(folder: Path) -> FluxVAEParams:
    """vae/config.json -> FluxVAEParams; unknown keys and unsupported variants are one-line ConfigErrors."""
    where = f"{folder}/config.json"
    config = read_json(folder / "config.json")
    params = params_from_config(FluxVAEParams, config, FLUX_VAE_CONFIG, FLUX_VAE_CONFIG_IGNORED, where=where,
                                required=FLUX_VAE_CONFIG_REQUIRED)
    _check_variant(config, where)
    absent = [k for k in FLUX_VAE_LATENT_FACTORS if config.get(k) is None]
    if absent:
        raise ConfigError(f"{where} lacks {' and '.join(absent)}, which map its latents to FLUX's", hint=_HINT)
    g = params.norm_num_groups
    bad = [c for c in params.block_out_channels if c % g]
    if bad:
        raise ConfigError(f"{where}: norm_num_groups {g} does not divide block_out_channels {bad[0]}", hint=_HINT)
    return params


def load_flux_vae(folder: Path, *, device: torch.device | str, dtype: torch.dtype) -> FluxVAE:
    """vae/: AutoencoderKL's config.json and diffusion_pytorch_model.safetensors, every tensor checked."""
    params = flux_vae_params(folder)
    model = load_module(lambda: FluxVAE(params), safetensors_files(folder), device=device, dtype=dtype,
                        what=f"{folder.name}/ weights")
    return model.eval().requires_grad_(False)
