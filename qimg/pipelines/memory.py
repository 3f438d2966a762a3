"""Qwen-Image memory glue: byte counts of a model folder (from the safetensors headers, before anything loads)
for the planner, and loading each component the way the plan places it (resident, swapped, streamed)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qimg.loading import components
from qimg.loading.checkpoint import safetensors_files, tensor_headers
from qimg.nets.qwen_mmdit import QwenMMDiT
from qimg.nets.qwen_vae import QwenVAE
from qimg.runtime.fp8 import apply_fp8, qwen_mmdit_fp8_layers
from qimg.runtime.offload import HostCopy, Offloaded, module_tensors, prepare_blocks
from qimg.runtime.planner import Footprint, GiB, MemoryPlan, MiB, Needs, plan_memory

_MMDIT_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
_TE_LAYER = re.compile(r"(?:model\.)?(?:language_model\.)?layers\.(\d+)\.")
_TE_LINEARS = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.o_proj",
               ".mlp.gate_proj", ".mlp.up_proj", ".mlp.down_proj")
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def te_fp8_layers(name: str, module: nn.Linear) -> bool:
    """The text encoder linears stored in FP8: attention and MLP projections of the language model's layers
    (the vision tower, the embeddings and the norms stay in the compute dtype)."""
    return _TE_LAYER.match(name) is not None and "visual" not in name and name.endswith(_TE_LINEARS)


def _footprint(
    headers: dict[str, tuple[str, tuple[int, ...]]],
    block_of: Callable[[str], int | None],
    dtype_bytes: int,
    fp8: Callable[[str], bool] | None,
    act: int,
    skip: Callable[[str], bool] = lambda name: False,
) -> Footprint:
    """Device bytes after loading: floating tensors in the compute dtype, FP8-chosen weights at one byte per
    value plus an fp32 scale per output row."""
    rest, blocks = 0, {}
    for name, (dt, shape) in headers.items():
        if skip(name):
            continue
        numel = 1
        for d in shape:
            numel *= d
        if fp8 is not None and len(shape) == 2 and name.endswith(".weight") and fp8(name.removesuffix(".weight")):
            n = numel + 4 * shape[0]
        else:
            n = numel * (dtype_bytes if dt.startswith(("F", "BF")) else _BYTES.get(dt, 4))
        i = block_of(name)
        if i is None:
            rest += n
        else:
            blocks[i] = blocks.get(i, 0) + n
    return Footprint(rest, tuple(blocks[i] for i in sorted(blocks)), act)


def transformer_footprint(folder: Path, dtype: torch.dtype, fp8: str | None, tokens: int, batch: int) -> Footprint:
    """The MMDiT's bytes; activations: the largest per-block working set (hidden states, q/k/v, the 4x MLP) for
    `tokens` (image + reference + text) tokens of `batch` rows, measured to stay within 16 hidden-state copies."""
    params = components.qwen_mmdit_params(folder)
    size = torch.empty(0, dtype=dtype).element_size()
    act = batch * tokens * params.dim * size * 16 + 64 * MiB
    if fp8 == "weights":  # each FP8 linear upcasts its weight (fp32, then the compute dtype) just before use
        act += params.dim * 4 * params.dim * (4 + size)

    def block_of(name: str) -> int | None:
        m = _MMDIT_BLOCK.match(name)
        return int(m.group(1)) if m else None

    chosen = None if fp8 is None else (lambda name: qwen_mmdit_fp8_layers(name, None))  # type: ignore[arg-type]
    return _footprint(tensor_headers(safetensors_files(folder)), block_of, size, chosen, act)


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

    chosen = None if fp8 is None else (lambda name: te_fp8_layers(name, None))  # type: ignore[arg-type]
    headers = tensor_headers(safetensors_files(folder, "model"))
    return _footprint(headers, block_of, size, chosen, act, skip)


def vae_needs(folder: Path, dtype: torch.dtype, pixels: int) -> tuple[Footprint, int]:
    """The VAE's bytes, its untiled peak working memory for `pixels` (2.6 GiB per megapixel measured for the
    channels-last decoder in bf16 on an H100, bench/results/vae_h100.json) and its tiled peak (512 px tiles)."""
    size = torch.empty(0, dtype=dtype).element_size()
    # Counted on the 2-D network qimg runs (the checkpoint's 3-D video kernels are larger than what loads).
    with torch.device("meta"):
        net = QwenVAE(components.qwen_vae_params(folder))
    weights = sum(t.numel() for t in net.state_dict().values()) * size
    scale = size / 2
    untiled = int(2.6 * GiB * scale * pixels / 2**20)
    tiled = int(1.1 * GiB * scale) + pixels * 3 * 4 * 2  # plus the blended fp32 output canvas and its weights
    return Footprint(weights, (), untiled), tiled


def qwen_needs(
    root: Path,
    dtype: torch.dtype,
    fp8: str | None,
    *,
    task: str,
    width: int = 1024,
    height: int = 1024,
    cfg: bool = True,
    ref_pixels: int = 0,
    text_encoder: bool = True,
) -> Needs:
    """What a run of this model folder needs on the device for one request shape (default 1024x1024 with CFG;
    edit models add their reference images' tokens)."""
    pixels = width * height
    tokens = pixels // 256 + ref_pixels // 256 + 1024  # image tokens, reference tokens, text tokens (at most)
    vae, tiled = vae_needs(root / "vae", dtype, max(pixels, ref_pixels))
    return Needs(
        transformer=transformer_footprint(root / "transformer", dtype, fp8, tokens, 2 if cfg else 1),
        vae=vae,
        vae_tiled_act=tiled,
        text_encoder=text_encoder_footprint(root / "text_encoder", dtype, fp8, task) if text_encoder else None,
    )


def make_plan(
    root: Path,
    device: torch.device,
    dtype: torch.dtype,
    fp8: str | None,
    *,
    task: str,
    offload: str,
    budget_gib: float | None,
    text_encoder_device: str | None,
    vae_tiling: bool,
    **shape: Any,
) -> tuple[MemoryPlan, Needs]:
    """The plan for a CUDA device: the budget given, else the memory free on the device right now."""
    needs = qwen_needs(root, dtype, fp8, task=task, **shape)
    if budget_gib is not None:
        budget = int(budget_gib * GiB)
    elif device.type == "cuda":
        budget = torch.cuda.mem_get_info(cuda_index(device))[0] + torch.cuda.memory_reserved(cuda_index(device))
    else:
        budget = None
    if device.type != "cuda":
        offload = "none"
    plan = plan_memory(needs, budget=budget, mode=offload, text_encoder_device=text_encoder_device,
                       vae_tiling=vae_tiling)
    return plan, needs


def cuda_index(device: torch.device) -> int:
    """The CUDA device number ("cuda" alone means the current device; some torch.cuda calls need the number)."""
    return torch.cuda.current_device() if device.index is None else device.index


def load_transformer(
    folder: Path, device: torch.device, dtype: torch.dtype, fp8: str | None, plan: MemoryPlan
) -> tuple[QwenMMDiT, Offloaded | None]:
    """The MMDiT loaded block by block: each block is read (memory-mapped), put on the device, FP8-quantised if
    asked, then kept there (resident plan) or packed into pinned host memory (offload plans), so neither the
    host nor the device ever holds the whole bf16 checkpoint."""
    keep = plan.mode == "none"
    copies: dict[int, HostCopy] = {}

    def place(prefix: str, model: nn.Module) -> None:
        m = _MMDIT_BLOCK.match(prefix + ".")
        block = model.get_submodule(prefix)
        if fp8 is not None:
            apply_fp8(block, lambda name, lin: qwen_mmdit_fp8_layers(f"{prefix}.{name}", lin), compute=fp8 == "compute")
        if not keep and m is not None:
            copies[int(m.group(1))] = HostCopy(module_tensors(block))

    def group(name: str) -> str | None:
        m = _MMDIT_BLOCK.match(name)
        return m.group(0)[:-1] if m else None

    model = components.load_qwen_mmdit(folder, device=device, dtype=dtype, group=group, on_group=place)
    if keep:
        return model, None
    offloaded = Offloaded(model, device, model.transformer_blocks, block_copies=copies)
    offloaded.stream(plan.streamed.get("transformer", ()))
    return model, offloaded


def text_encoder_layers(model: Any) -> nn.ModuleList:
    """The language model's decoder layers of a transformers Qwen2.5-VL (4.5x and 5.x module layouts)."""
    inner = model.model
    lm = getattr(inner, "language_model", inner)
    return lm.layers


def load_text_encoder(
    folder: Path, device: torch.device, dtype: torch.dtype, fp8: str | None, plan: MemoryPlan | None, task: str
) -> tuple[Any, Offloaded | None]:
    """The Qwen2.5-VL text encoder placed as planned: on the device, on the CPU, or in host memory visiting
    the device for the text phase (its layers streamed when they do not fit). Unused parts are dropped: the LM
    head always, the vision tower for text-to-image. FP8 storage covers the language model's linears."""
    # Normal tensors even when the first prompt arrives inside inference mode: offloading rebinds their storage.
    with torch.inference_mode(False), torch.no_grad():
        return _load_text_encoder(folder, device, dtype, fp8, plan, task)


def _load_text_encoder(
    folder: Path, device: torch.device, dtype: torch.dtype, fp8: str | None, plan: MemoryPlan | None, task: str
) -> tuple[Any, Offloaded | None]:
    model = components.load_text_encoder(folder, device="cpu", dtype=dtype)
    model.lm_head = nn.Identity()  # ~1 GiB of logits weights the prompt encoding never reads
    if task != "edit":
        model.model.visual = None  # text-only prompts never reach the vision tower (~1.3 GiB)
    runs_on = torch.device("cpu") if plan is not None and plan.text_encoder_device == "cpu" else device
    offloaded = plan is not None and plan.mode != "none" and plan.text_encoder_device != "cpu"
    # Quantise on the GPU when there is one (seconds, against minutes on the CPU), a layer at a time.
    work = device if device.type == "cuda" else torch.device("cpu")
    layers = text_encoder_layers(model)

    def prepare(prefix: str, layer: nn.Module) -> None:
        if fp8 is not None:
            apply_fp8(layer, lambda name, lin: te_fp8_layers(f"layers.{prefix}{name}", lin), compute=False)
        if runs_on.type == "cpu":
            layer.to("cpu")

    copies = prepare_blocks(layers, work, prepare, keep=lambda i: not offloaded)
    if not offloaded:
        return model.to(runs_on), None
    result = Offloaded(model, device, layers, block_copies=copies)
    result.stream(plan.streamed.get("text_encoder", ()) if plan is not None else ())
    return model, result
