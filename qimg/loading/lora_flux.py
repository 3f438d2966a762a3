"""FLUX LoRA layouts beyond the BFL names: XLabs' processor LoRAs, read as fused modules and split onto the diffusers
linears exactly as lora_fused.py splits the BFL ones, and BFL's Control LoRAs, told apart so that they are refused
(they need a control-image pipeline qimg does not have)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from qimg.loading.keymaps import FLUX_CONTROL_EMBEDDERS, FLUX_CONTROL_MARKERS, FLUX_XLABS_MODULES
from qimg.loading.lora_fused import fused_modules

# The low-rank down matrix of the patch embedder in any dialect: "img_in.lora_A.weight", "transformer.x_embedder.
# lora_A.weight", "lora_unet_img_in.lora_down.weight", ...
_EMBEDDER_DOWN = re.compile(rf"(?:^|[._])(?:{'|'.join(FLUX_CONTROL_EMBEDDERS)})\.(?:lora_A|lora_down)(?:\.|$)")


def xlabs_modules(linears: Mapping[str, tuple[int, int]]) -> dict[str, tuple[str, ...]]:
    """XLabs' processor names -> the model's linears each covers (FLUX_XLABS_MODULES), for every block the model has."""
    return fused_modules(FLUX_XLABS_MODULES, linears)


def control_lora_key(keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]],
                     linears: Mapping[str, tuple[int, int]]) -> tuple[str, str] | None:
    """(key, what it shows) where a file is one of BFL's FLUX Control LoRAs (Canny, Depth), else None: a replaced
    QK-norm scale, or a patch-embedder down taking twice the model's input channels (noise + control latents)."""
    keys = list(keys)
    marked = next((k for k in keys if k.endswith(FLUX_CONTROL_MARKERS)), None)
    if marked is not None:
        return marked, "replaces a QK-norm scale"
    if "x_embedder" not in linears:
        return None
    width = linears["x_embedder"][1]
    for key in keys:
        if _EMBEDDER_DOWN.search(key) is None:
            continue
        shape = shape_of(key)
        if len(shape) == 2 and shape[1] == 2 * width:
            return key, f"takes {shape[1]} input channels, twice the model's {width}"
    return None
