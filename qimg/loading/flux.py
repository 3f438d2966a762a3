"""FLUX.1 transformer loading: diffusers' FluxTransformer2DModel config and weights into qimg.nets.flux, strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qimg.errors import ConfigError
from qimg.loading.checkpoint import load_module, meta_device, params_from_config, read_json, safetensors_files
from qimg.loading.single_file import TransformerFile
from qimg.nets.flux import FluxTransformer
from qimg.specs import FluxParams

# transformer/config.json of FluxTransformer2DModel -> FluxParams (the field names are the config's own)
FLUX_CONFIG = {
    "patch_size": "patch_size",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_layers": "num_layers",
    "num_single_layers": "num_single_layers",
    "attention_head_dim": "attention_head_dim",
    "num_attention_heads": "num_attention_heads",
    "joint_attention_dim": "joint_attention_dim",
    "pooled_projection_dim": "pooled_projection_dim",
    "guidance_embeds": "guidance_embeds",
    "axes_dims_rope": "axes_dims_rope",
}
# Keys that fix the network's shapes and that every released config states: without one, a default-sized net would
# be built and the whole checkpoint reported as mismatched, so the absent key is the error to report.
FLUX_CONFIG_REQUIRED = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                        "joint_attention_dim", "in_channels")
# Every FluxTransformer2DModel argument shapes the network, so none is ignored.
FLUX_CONFIG_IGNORED: tuple[str, ...] = ()
# Where a config leaves a key out, diffusers' class default applies; for guidance_embeds that is False, unlike
# FluxParams (whose defaults are the released FLUX.1-dev).
FLUX_CONFIG_DEFAULTS: dict[str, Any] = {"guidance_embeds": False}


def flux_params(folder: Path) -> FluxParams:
    """transformer/config.json -> FluxParams; unknown keys and layouts qimg does not build are refused."""
    where = f"{folder}/config.json"
    config = {**FLUX_CONFIG_DEFAULTS, **read_json(folder / "config.json")}
    params = params_from_config(FluxParams, config, FLUX_CONFIG, FLUX_CONFIG_IGNORED, where=where,
                                required=FLUX_CONFIG_REQUIRED)
    if params.patch_size != 1:  # FLUX.1 packs 2x2 latent patches into 64 channels itself; patch_size stays 1
        raise ConfigError(f"{where} sets patch_size {params.patch_size}; qimg runs FLUX.1 transformers with 1 only",
                          hint="use a FLUX.1 model in the diffusers layout")
    if len(params.axes_dims_rope) != 3 or sum(params.axes_dims_rope) != params.attention_head_dim:
        raise ConfigError(f"{where} sets axes_dims_rope {list(params.axes_dims_rope)}, which must be 3 values "
                          f"summing to attention_head_dim {params.attention_head_dim}",
                          hint="the config is damaged; re-download the model")
    return params


def load_flux(folder: Path, *, device: torch.device | str, dtype: torch.dtype, weights: TransformerFile | None = None,
              **grouping: Any) -> FluxTransformer:
    """transformer/: config.json and diffusion_pytorch_model(.safetensors | -NNNNN-of-NNNNN + index), strictly; or,
    with `weights` (--transformer FILE, diffusers key names), that file's tensors into the folder config's shapes.
    grouping: load_module's group / on_group (block-by-block loading)."""
    params = flux_params(folder)
    if weights is not None:
        model = weights.load(lambda: FluxTransformer(params), device=device, dtype=dtype, **grouping)
    else:
        model = load_module(lambda: FluxTransformer(params), safetensors_files(folder), device=device, dtype=dtype,
                            what=f"{folder.name}/ weights", **grouping)
    return model.eval().requires_grad_(False)  # type: ignore[return-value]


def flux_linears(folder: Path | None) -> dict[str, tuple[int, int]]:
    """The transformer's linears (name -> (out, in)) for a transformer/ folder's config, or the released FLUX.1-dev."""
    params = FluxParams() if folder is None else flux_params(folder)
    with meta_device():
        net = FluxTransformer(params)
    return {n: (m.out_features, m.in_features) for n, m in net.named_modules() if isinstance(m, nn.Linear)}
