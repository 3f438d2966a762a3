"""The Qwen-Image family (Qwen-Image, -2512, -Edit, -Edit-2509, -Edit-2511): its loaders, block list, FP8
predicates and memory estimator, as one record that qimg.load dispatches to."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from qimg.errors import CheckpointError
from qimg.loading import components
from qimg.loading.checkpoint import meta_device, safetensors_files, tensor_headers
from qimg.loading.single_file import TransformerFile
from qimg.nets.qwen_mmdit import QwenMMDiT
from qimg.nets.qwen_vae import QwenVAE
from qimg.pipelines.family import BlockLists, Family
from qimg.pipelines.memory import block_train_needs, denoiser_footprint, footprint, stored_fp8_mode
from qimg.pipelines.prompts import encode_prompt
from qimg.pipelines.qwen import QwenImagePipeline, table_timesteps
from qimg.runtime.modulation import ModulationSites
from qimg.runtime.planner import Footprint, GiB, MiB, Needs, RequestShape, TrainNeeds
from qimg.specs import QwenMMDiTParams
from qimg.training.config import TARGETS
from qimg.training.step import flow_loss

BLOCKS = BlockLists(("transformer_blocks",))

# Inside each transformer block: the attention projections and the MLPs (all the matmul FLOPs that grow with
# the token count; the modulation linears see one row per sample).
_BLOCK_LINEARS = (
    ".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj",
    ".attn.to_out.0", ".attn.to_add_out", "_mlp.net.0.proj", "_mlp.net.2",
)  # fmt: skip
_TE_LAYER = re.compile(r"(?:model\.)?(?:language_model\.)?layers\.(\d+)\.")
_TE_LINEARS = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.o_proj",
               ".mlp.gate_proj", ".mlp.up_proj", ".mlp.down_proj")


def mmdit_fp8_layers(name: str, module: nn.Linear | None) -> bool:
    """The MMDiT linears that tolerate FP8: attention projections and MLPs of the blocks. Modulation,
    embeddings, norms, img_in / txt_in / proj_out / norm_out stay in the compute dtype."""
    return name.startswith("transformer_blocks.") and name.endswith(_BLOCK_LINEARS)


def text_encoder_fp8_layers(name: str, module: nn.Linear | None) -> bool:
    """The text encoder linears stored in FP8: attention and MLP projections of the language model's layers
    (the vision tower, the embeddings and the norms stay in the compute dtype)."""
    return _TE_LAYER.match(name) is not None and "visual" not in name and name.endswith(_TE_LINEARS)


def transformer_footprint(folder: Path, dtype: torch.dtype, fp8: str | None, tokens: int, batch: int,
                          weights: TransformerFile | None = None) -> Footprint:
    """The MMDiT's bytes (its weights from `weights`, a single file, when given); activations: the largest
    per-block working set (hidden states, q/k/v, the 4x MLP) for `tokens` (image + reference + text) tokens of
    `batch` rows, measured to stay within 16 hidden-state copies."""
    params = components.qwen_mmdit_params(folder)
    size = torch.empty(0, dtype=dtype).element_size()
    act = batch * tokens * params.dim * size * 16 + 64 * MiB
    if stored_fp8_mode(fp8, weights) == "weights":
        act += params.dim * 4 * params.dim * (4 + size)  # an FP8 linear upcasts its weight just before use
    return denoiser_footprint(folder, BLOCKS, mmdit_fp8_layers, dtype, fp8, act, weights=weights)


def text_encoder_footprint(folder: Path, dtype: torch.dtype, fp8: str | None, task: str) -> Footprint:
    """The Qwen2.5-VL encoder as qimg keeps it: no LM head (only hidden states are read), no vision tower for
    text-to-image. Activations: one layer's working set for a 1,100-token prompt, plus vision for edit models."""
    size = torch.empty(0, dtype=dtype).element_size()
    config = components.read_json(folder / "config.json")
    text = config.get("text_config") or config
    hidden, inter = int(text.get("hidden_size", 3584)), int(text.get("intermediate_size", 18944))
    act = 1100 * (4 * hidden + 3 * inter) * size + (512 * MiB if task == "edit" else 64 * MiB)

    def block_of(name: str) -> int | None:
        m = _TE_LAYER.match(name)
        return int(m.group(1)) if m and "visual" not in name else None

    def skip(name: str) -> bool:
        return name.startswith("lm_head.") or (task != "edit" and "visual." in name)

    chosen = None if fp8 is None else (lambda name: text_encoder_fp8_layers(name, None))
    headers = tensor_headers(safetensors_files(folder, "model"))
    return footprint(headers, block_of, size, chosen, act, skip)


def vae_needs(folder: Path, dtype: torch.dtype, pixels: int) -> tuple[Footprint, int]:
    """The VAE's bytes, its untiled peak working memory for `pixels` (2.6 GiB per megapixel measured for the
    channels-last decoder in bf16 on an H100, bench/results/vae_h100.json) and its tiled peak (512 px tiles)."""
    size = torch.empty(0, dtype=dtype).element_size()
    # Counted on the 2-D network qimg runs (the checkpoint's 3-D video kernels are larger than what loads).
    with meta_device():
        net = QwenVAE(components.qwen_vae_params(folder))
    weights = sum(t.numel() for t in net.state_dict().values()) * size
    scale = size / 2
    untiled = int(2.6 * GiB * scale * pixels / 2**20)
    tiled = int(1.1 * GiB * scale) + pixels * 3 * 4 * 2  # plus the blended fp32 output canvas and its weights
    return Footprint(weights, (), untiled), tiled


def qwen_needs(root: Path, dtype: torch.dtype, fp8: str | None, task: str, shape: RequestShape, *,
               weights: TransformerFile | None = None) -> Needs:
    """What a run of this model folder (its transformer weights from `weights`, a single file, when given) needs
    on the device for one request shape (edit models add their reference images' tokens)."""
    pixels = shape.width * shape.height
    tokens = pixels // 256 + shape.ref_pixels // 256 + 1024  # image tokens, reference tokens, text tokens (at most)
    vae, tiled = vae_needs(root / "vae", dtype, max(pixels, shape.ref_pixels))
    return Needs(
        transformer=transformer_footprint(root / "transformer", dtype, fp8, tokens, 2 if shape.cfg else 1, weights),
        vae=vae,
        vae_tiled_act=tiled,
        text_encoder=text_encoder_footprint(root / "text_encoder", dtype, fp8, task) if shape.text_encoder else None,
    )


def load_mmdit(folder: Path, *, device: torch.device | str, dtype: torch.dtype, weights: TransformerFile | None = None,
               **grouping: object) -> QwenMMDiT:
    """transformer/ as the folder has it, or with its weights from one file (its config.json still sets the
    shapes). grouping: load_module's group / on_group."""
    if weights is None:
        return components.load_qwen_mmdit(folder, device=device, dtype=dtype, **grouping)  # type: ignore[arg-type]
    params = components.qwen_mmdit_params(folder)
    # ComfyUI marks Edit-2511 transformers this way; the folder must be one whose config runs them (zero_cond_t).
    if "__index_timestep_zero__" in weights.flags and not params.zero_cond_t:
        raise CheckpointError(f"{weights.path.name} is a Qwen-Image-Edit-2511 transformer (it carries ComfyUI's "
                              f"__index_timestep_zero__ marker); {folder.parent.name} is not an Edit-2511 model",
                              hint="use it with --model qwen-image-edit-2511")
    model = weights.load(lambda: QwenMMDiT(params), device=device, dtype=dtype, **grouping)
    return model.eval().requires_grad_(False)  # type: ignore[return-value]


def load_vae(folder: Path, device: torch.device, dtype: torch.dtype) -> QwenVAE:
    """The VAE channels-last: 1.3x faster decode with less memory on an H100 (bench/results/vae_h100.json)."""
    vae = components.load_qwen_vae(folder, device=device, dtype=dtype)
    return vae.to(memory_format=torch.channels_last)


def mmdit_linears(folder: Path | None) -> dict[str, tuple[int, int]]:
    """The MMDiT's linears (name -> (out, in)) for a transformer/ folder's config, or the released 20B model."""
    params = QwenMMDiTParams() if folder is None else components.qwen_mmdit_params(folder)
    with meta_device():
        net = QwenMMDiT(params)
    return {n: (m.out_features, m.in_features) for n, m in net.named_modules() if isinstance(m, nn.Linear)}


def qwen_train_needs(root: Path, dtype: torch.dtype, fp8: str | None, tokens: int, batch: int, adapter_params: int,
                     *, weights: TransformerFile | None = None) -> TrainNeeds:
    """What a LoRA training step of `batch` rows of `tokens` tokens (image, control, text) needs on the device;
    adapter_params: the trainable values (fp32, with a gradient and AdamW's two moments: 16 bytes each)."""
    fp = transformer_footprint(root / "transformer", dtype, fp8, tokens, batch, weights)
    params = components.qwen_mmdit_params(root / "transformer")
    return block_train_needs(fp, params.dim, torch.empty(0, dtype=dtype).element_size(), tokens, batch,
                             adapter_params)


QWEN_IMAGE = Family(
    name="qwen-image",
    pipeline=QwenImagePipeline,
    denoiser_folder="transformer",
    load_denoiser=load_mmdit,
    denoiser_blocks=BLOCKS,
    denoiser_fp8=mmdit_fp8_layers,
    text_encoder_fp8=text_encoder_fp8_layers,
    load_vae=load_vae,
    needs=qwen_needs,
    encode_prompt=encode_prompt,
    denoiser_linears=mmdit_linears,
    train_needs=qwen_train_needs,
    train_targets=TARGETS,
    train_loss=flow_loss,
    cfg_norm_rescale=True,
    modulation=ModulationSites(
        time_embed="time_text_embed", blocks=BLOCKS.names, per_block=("img_mod", "txt_mod"),
        embed=lambda model, t, dtype: model.time_text_embed(t, dtype), keys=table_timesteps,
    ),
)
