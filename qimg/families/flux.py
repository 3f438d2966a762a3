"""The FLUX.1 family record: FLUX.1-dev (text to image, img2img, inpainting) and FLUX.1-Kontext-dev (editing).

The denoiser is `nets/flux.py`'s double- then single-stream blocks (two block lists, streamed and compiled in run
order), the VAE `nets/flux_vae.py`'s 16-channel AutoencoderKL, the prompt CLIP-L's pooled vector plus T5-XXL's
hidden states (`pipelines/flux_prompts.py`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from qimg.loading.checkpoint import safetensors_files, tensor_headers
from qimg.loading.flux import flux_linears, flux_params, load_flux
from qimg.loading.flux_vae import load_flux_vae
from qimg.loading.single_file import TransformerFile
from qimg.nets.flux_vae import FluxVAE
from qimg.pipelines.family import BlockLists, Family
from qimg.pipelines.flux import FluxPipeline
from qimg.pipelines.flux_prompts import encode_prompt, t5_fp8_layers
from qimg.pipelines.memory import block_train_needs, denoiser_footprint, footprint, stored_fp8_mode
from qimg.runtime.planner import Footprint, GiB, MiB, Needs, RequestShape, TrainNeeds
from qimg.training.config import FLUX_TARGETS
from qimg.training.flux_step import flux_flow_loss

BLOCKS = BlockLists(("transformer_blocks", "single_transformer_blocks"))

# The matmuls whose FLOPs grow with the token count: attention projections and MLPs of both block kinds.
# Modulation (norm1*, norm.linear), embedders, x_embedder, context_embedder, norm_out and proj_out stay bf16.
_DOUBLE = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj",
           ".attn.to_out.0", ".attn.to_add_out", ".ff.net.0.proj", ".ff.net.2", ".ff_context.net.0.proj",
           ".ff_context.net.2")
_SINGLE = (".attn.to_q", ".attn.to_k", ".attn.to_v", ".proj_mlp", ".proj_out")
_T5_BLOCK = re.compile(r"encoder\.block\.(\d+)\.")


def flux_fp8_layers(name: str, module: nn.Linear | None) -> bool:
    """The FLUX linears FP8 replaces: the blocks' attention projections and MLPs."""
    if name.startswith("transformer_blocks."):
        return name.endswith(_DOUBLE)
    return name.startswith("single_transformer_blocks.") and name.endswith(_SINGLE)


def transformer_footprint(folder: Path, dtype: torch.dtype, fp8: str | None, tokens: int, batch: int,
                          weights: TransformerFile | None = None) -> Footprint:
    """The transformer's bytes; activations: one block's working set (hidden states, q/k/v, the 4x MLP) for
    `tokens` tokens of `batch` rows, within 16 hidden-state copies as measured for the Qwen MMDiT of the same
    width."""
    params = flux_params(folder)
    size = torch.empty(0, dtype=dtype).element_size()
    act = batch * tokens * params.dim * size * 16 + 64 * MiB
    if stored_fp8_mode(fp8, weights) == "weights":
        act += params.dim * 5 * params.dim * (4 + size)  # the largest FP8 linear (single proj_out) upcast
    return denoiser_footprint(folder, BLOCKS, flux_fp8_layers, dtype, fp8, act, weights=weights)


def text_encoder_footprint(root: Path, dtype: torch.dtype, fp8: str | None) -> Footprint:
    """CLIP-L (in `rest`) and T5-XXL (its blocks listed, so the planner can stream them) as one footprint;
    activations: a T5 block's working set for 512 tokens."""
    size = torch.empty(0, dtype=dtype).element_size()
    headers = {f"clip.{k}": v for k, v in tensor_headers(safetensors_files(root / "text_encoder", "model")).items()}
    headers.update(tensor_headers(safetensors_files(root / "text_encoder_2", "model")))

    def block_of(name: str) -> int | None:
        m = _T5_BLOCK.match(name)
        return int(m.group(1)) if m else None

    chosen = None if fp8 is None else (lambda name: t5_fp8_layers(name, None))
    return footprint(headers, block_of, size, chosen, 512 * (4 * 4096 + 3 * 10240) * size + 64 * MiB)


def vae_needs(folder: Path, dtype: torch.dtype, pixels: int) -> tuple[Footprint, int]:
    """The VAE's bytes and its peak working memory untiled (the decoder's 512-channel full-resolution stages:
    about 3.5 GiB per megapixel in bf16) and tiled (512-pixel tiles)."""
    size = torch.empty(0, dtype=dtype).element_size()
    headers = tensor_headers(safetensors_files(folder))
    weights = sum(_numel(shape) for _, shape in headers.values()) * size
    scale = size / 2
    untiled = int(3.5 * GiB * scale * pixels / 2**20)
    tiled = int(1.2 * GiB * scale) + pixels * 3 * 4 * 2
    return Footprint(weights, (), untiled), tiled


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def flux_needs(root: Path, dtype: torch.dtype, fp8: str | None, task: str, shape: RequestShape, *,
               weights: TransformerFile | None = None) -> Needs:
    """What a run of this FLUX.1 folder needs on the device for one request shape (Kontext adds its reference
    image's tokens)."""
    pixels = shape.width * shape.height
    tokens = pixels // 256 + shape.ref_pixels // 256 + 512
    vae, tiled = vae_needs(root / "vae", dtype, max(pixels, shape.ref_pixels))
    return Needs(
        transformer=transformer_footprint(root / "transformer", dtype, fp8, tokens, 2 if shape.cfg else 1, weights),
        vae=vae,
        vae_tiled_act=tiled,
        text_encoder=text_encoder_footprint(root, dtype, fp8) if shape.text_encoder else None,
    )


# Hidden-state copies one FLUX block keeps for its backward, averaged over the 19 double and 38 single blocks:
# bench/flux_train.py's un-checkpointed eager step (1024x1024 + 512 text tokens, rank 16, H200,
# bench/results/flux_train_h200.json) peaked 27.2 GiB over the weights, 1.0 GiB of it the adapters with their
# gradients and AdamW state: 26.2 GiB / 57 blocks / 27 MiB per copy = 17.4. Rounded up for headroom.
FLUX_TRAIN_SAVED_COPIES = 18


def flux_train_needs(root: Path, dtype: torch.dtype, fp8: str | None, tokens: int, batch: int, adapter_params: int,
                     *, weights: TransformerFile | None = None) -> TrainNeeds:
    """What a LoRA training step of `batch` rows of `tokens` tokens (image, Kontext controls, 512 text) needs on
    the device (saved activations: FLUX_TRAIN_SAVED_COPIES per block)."""
    fp = transformer_footprint(root / "transformer", dtype, fp8, tokens, batch, weights)
    params = flux_params(root / "transformer")
    return block_train_needs(fp, params.dim, torch.empty(0, dtype=dtype).element_size(), tokens, batch,
                             adapter_params, saved_copies=FLUX_TRAIN_SAVED_COPIES)


def load_vae(folder: Path, device: torch.device, dtype: torch.dtype) -> FluxVAE:
    vae = load_flux_vae(folder, device=device, dtype=dtype)
    return vae.to(memory_format=torch.channels_last)


FLUX = Family(
    name="flux",
    pipeline=FluxPipeline,
    denoiser_folder="transformer",
    load_denoiser=load_flux,
    denoiser_blocks=BLOCKS,
    denoiser_fp8=flux_fp8_layers,
    text_encoder_fp8=t5_fp8_layers,
    load_vae=load_vae,
    needs=flux_needs,
    encode_prompt=encode_prompt,
    denoiser_linears=flux_linears,
    train_needs=flux_train_needs,
    train_targets=FLUX_TARGETS,
    train_loss=flux_flow_loss,
    cfg_norm_rescale=False,
)
