"""VAE round trip: image -> latents -> image, with PSNR/SSIM and timings; the library side of `qimg vae roundtrip`.

The image is prepared as diffusers' VaeImageProcessor does for Qwen-Image (RGB, x / 127.5 - 1 in [-1, 1]),
except that a size that is not a multiple of 8 px (the VAE's spatial factor) is center-cropped by the few pixels
over it instead of resampled, so the round trip measures the VAE alone: 200x200 goes through whole, 203x201 loses
3 and 1 px. (The pipelines' multiple of 16 comes from the transformer's 2x2 patches, which no round trip uses.)
The encoder's posterior mean (its mode, what the edit pipelines use) is decoded; metrics compare the cropped input
with the decoded image as written (8-bit), in [0, 1].
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from qimg.errors import InputError
from qimg.metrics import psnr, ssim
from qimg.png import check_output_path, conform_image, read_image, write_atomic
from qimg.runtime.devices import pick_dtype
from qimg.runtime.options import Tiling
from qimg.runtime.tiling import decode_tiled, encode_tiled
from qimg.version import __version__

if TYPE_CHECKING:
    from PIL import Image

MULTIPLE = 8  # the VAE's spatial factor: it takes any multiple of 8 px (the pipelines' 16 is for the 2x2 patches)
LATENTS_KEY = "latents"
LATENTS_KIND = "raw_posterior_mean"  # what the file holds: VAE space, not the transformer's normalised space


@dataclass
class RoundtripResult:
    """One round trip: the decoded PIL image (parameters in image.info["qimg"]), the latents and the scores."""

    image: Image.Image
    latents: Tensor  # (1, z_dim, H/8, W/8) float32 on the CPU: the raw posterior mean, not normalised
    psnr: float  # dB, cropped input vs decoded 8-bit output, both in [0, 1]
    ssim: float
    encode_seconds: float
    decode_seconds: float
    notes: tuple[str, ...] = ()  # one line each: how the input was changed (crop, alpha dropped)
    params: dict[str, Any] = field(default_factory=dict)
    vae_params: Any = None  # the VAE's params (Qwen: latents_mean/std, stored with saved latents)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image that went through the VAE."""
        return self.image.size


def make_tiling(tile: int, overlap: int) -> Tiling:
    """Tiling from user input: the same checks as Tiling, raised as InputError (exit 1 in the CLI)."""
    try:
        return Tiling(tile, overlap)
    except ValueError as e:
        raise InputError(str(e), hint="e.g. --tile-size 512 --tile-overlap 64 (multiples of 8 px)") from e


def prepare_image(image: Image.Image) -> tuple[Image.Image, tuple[str, ...]]:
    """Upright (EXIF orientation), RGB, center-cropped to multiples of 8 px; notes say what changed, one each."""
    image, notes = conform_image(image, "RGB")  # upright, 16-bit scaled, alpha dropped (the same as every input)
    w, h = image.size
    # SSIM's 11 px window needs 11 px after the crop, and the first multiple of 8 from there is 16.
    smallest = 2 * MULTIPLE
    if w < smallest or h < smallest:
        raise InputError(f"image is {w}x{h} px; the VAE round trip needs at least {smallest}x{smallest}")
    cw, ch = w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE
    if (cw, ch) != (w, h):
        left, top = (w - cw) // 2, (h - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
        notes.append(f"cropped {w}x{h} to {cw}x{ch} (left {left}, right {w - cw - left}, top {top}, bottom "
                     f"{h - ch - top} px) to make both sides multiples of {MULTIPLE}; nothing was resampled")
    return image, tuple(notes)


def _to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL -> (1, 3, H, W) uint8."""
    import numpy as np

    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].contiguous()


def channels_last(vae: Any) -> Any:
    """Store the VAE's conv weights channels-last (NHWC), in place; the convs then run cuDNN's/oneDNN's NHWC
    kernels and pass NHWC activations on. Measured (bench/results/vae_h100.json, H100, bf16, 1024x1024):
    decode 49.9 -> 37.8 ms, encode 35.2 -> 23.9 ms, peak reserved 3.0 -> 2.7 and 4.3 -> 1.9 GiB. Same math,
    another summation order."""
    return vae.to(memory_format=torch.channels_last)


def _timed(fn: Any, device: torch.device) -> tuple[Any, float]:
    """fn() and its wall time; CUDA work is asynchronous, so synchronise before both clock reads."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def vae_roundtrip(
    vae: Any,
    image: Image.Image | str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    tiling: Tiling | None = None,
    model: str | None = None,
    source: str | None = None,
) -> RoundtripResult:
    """Encode an image to the posterior mean and decode it again, with PSNR/SSIM and encode/decode seconds.

    device and dtype default to the VAE's own; if given, the VAE is moved there. tiling runs the tiled encode
    and decode (qimg.runtime.tiling). model and source (the input file; default: the path given as image)
    are only recorded in the metadata.
    """
    from PIL import Image

    read: list[str] = []
    if isinstance(image, (str, Path)):
        source = source or str(image)
        image, read = read_image(image)
    prepared, notes = prepare_image(image)
    notes = (*read, *notes)
    first = next(vae.parameters())
    dev = torch.device(device) if device is not None else first.device
    dt = pick_dtype(dtype, dev) if dtype is not None else first.dtype
    if (first.device, first.dtype) != (dev, dt):
        vae.to(dev, dt)

    pixels = _to_tensor(prepared).to(dev)  # (1, 3, H, W) uint8
    x = (2.0 * (pixels.to(torch.float32) / 255.0) - 1.0).to(dt)  # VaeImageProcessor's arithmetic, in fp32
    try:
        with torch.inference_mode():
            if dev.type == "cuda":
                # A process's first CUDA convs load cuDNN and set up handles. An untimed 64 px pass took a
                # one-shot CLI encode of 992x992 on an H100 from 0.41 s to 0.14 s (24 ms warm, in the bench);
                # the rest is first-call cost of the real shapes, which only a full-size pass would remove.
                probe = torch.zeros(1, 3, 64, 64, device=dev, dtype=dt)
                vae.decode(vae.encode(probe)[0])
            (mean, _), t_enc = _timed(lambda: encode_tiled(vae, x, tiling) if tiling else vae.encode(x), dev)
            out, t_dec = _timed(lambda: decode_tiled(vae, mean, tiling) if tiling else vae.decode(mean), dev)
            # As diffusers' postprocess and qimg's pipelines: [-1, 1] -> [0, 1] -> round to 8 bits.
            decoded = ((out.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            score_psnr = psnr(pixels / 255.0, decoded / 255.0)
            score_ssim = ssim(pixels / 255.0, decoded / 255.0)
    except torch.cuda.OutOfMemoryError as e:
        if tiling is not None:
            raise
        w, h = prepared.size
        raise InputError(f"a {w}x{h} image does not fit on {dev} in one piece",
                         hint="pass --tiled-vae (library: tiling=Tiling()) to encode and decode it in tiles") from e

    w, h = prepared.size
    params = {
        "command": "vae roundtrip",
        "source": source,
        "model": model,
        "width": w,
        "height": h,
        "dtype": str(dt).removeprefix("torch."),
        "device": str(dev),
        "latents": LATENTS_KIND,
        "tile_size": tiling.tile if tiling else None,
        "tile_overlap": tiling.overlap if tiling else None,
        "psnr": round(score_psnr, 4),
        "ssim": round(score_ssim, 6),
        "encode_seconds": round(t_enc, 4),
        "decode_seconds": round(t_dec, 4),
        "notes": " | ".join(notes) or None,
        "qimg_version": __version__,
    }
    result_image = Image.fromarray(decoded[0].permute(1, 2, 0).cpu().numpy())
    result_image.info["qimg"] = params
    return RoundtripResult(
        image=result_image,
        latents=mean.float().cpu(),
        psnr=score_psnr,
        ssim=score_ssim,
        encode_seconds=t_enc,
        decode_seconds=t_dec,
        notes=notes,
        params=params,
        vae_params=vae.params,
    )


def check_latents_path(path: str | Path, *, overwrite: bool = False) -> Path:
    """Fail early, before any work, if a latents file cannot be written at `path`."""
    return check_output_path(path, overwrite=overwrite, suffix=".safetensors")


def save_latents(result: RoundtripResult, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write result.latents as safetensors (key "latents") with metadata saying what they are; atomic.

    The metadata holds the round trip's parameters, the model, the qimg version, the image size, and the
    per-channel latents_mean/latents_std that turn these raw latents into the transformer's.
    """
    from safetensors.torch import save

    out = check_latents_path(path, overwrite=overwrite)
    meta = {k: str(v) for k, v in result.params.items() if v is not None and k != "command"}
    meta.update({
        "format": "qimg vae latents",
        "latents": LATENTS_KIND,
        "normalized": "false",
        "layout": "(batch, channels, height / 8, width / 8), float32",
        "meaning": "the VAE encoder's posterior mean (mode) before any normalisation; the transformer's "
                   "latents are (z - latents_mean) / latents_std per channel",
    })  # fmt: skip
    for key in ("latents_mean", "latents_std"):
        if getattr(result.vae_params, key, None) is not None:
            meta[key] = json.dumps(list(getattr(result.vae_params, key)))
    data = save({LATENTS_KEY: result.latents.contiguous()}, metadata=meta)
    return write_atomic(out, lambda f: f.write(data), overwrite=overwrite)
