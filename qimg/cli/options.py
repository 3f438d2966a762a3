"""Options shared by several commands: the model argument, device and dtype, and their checks."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

import qimg

MODEL_ENV = "QIMG_MODEL"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


class DType(str, Enum):
    """Compute dtypes the engine supports."""

    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


def check_device(value: str | None) -> str | None:
    """Reject a malformed --device while parsing (exit 2); whether that GPU exists is checked at load."""
    if value is None or _DEVICE.fullmatch(value):
        return value
    raise typer.BadParameter(f"{value!r} is not one of cpu, cuda, cuda:N (e.g. cuda:1)")


def on_command_line(ctx: Any, name: str) -> bool:
    """Whether option `name` was typed (not taken from the environment, a default or a config file)."""
    source = ctx.get_parameter_source(name) if hasattr(ctx, "get_parameter_source") else None
    return getattr(source, "name", "") == "COMMANDLINE"


def require_model(model: str | None) -> str:
    """The --model value, or a usage error naming both ways to give one."""
    if not model:
        raise qimg.UsageError(
            "no model given",
            hint=f"pass --model qwen-image (see: qimg models), a repo id or a folder, or set {MODEL_ENV}",
        )
    return model


# VAE tiling, shared by generate, edit and vae roundtrip.
TiledVAE = Annotated[
    bool,
    typer.Option("--tiled-vae", help="Encode and decode in overlapping tiles: large images in little memory."),
]
TileSize = Annotated[
    int | None,
    typer.Option("--tile-size", metavar="PX",
                 help="Tile side in pixels, a multiple of 8 (implies --tiled-vae). Default: 512."),
]
TileOverlap = Annotated[
    int | None,
    typer.Option("--tile-overlap", metavar="PX", help="Overlap of neighbouring tiles in pixels, a multiple of 8 "
                 "below the tile size (implies --tiled-vae). Default: 64."),
]


def tiling_from(tiled_vae: bool, tile_size: int | None, tile_overlap: int | None) -> Any:
    """The requested qimg.Tiling, or None; a bad size is a one-line error before anything loads."""
    if not (tiled_vae or tile_size is not None or tile_overlap is not None):
        return None
    try:
        return qimg.Tiling(512 if tile_size is None else tile_size, 64 if tile_overlap is None else tile_overlap)
    except ValueError as e:
        raise qimg.QimgError(str(e), hint="e.g. --tile-size 512 --tile-overlap 64 (multiples of 8 px)") from None


class AttentionKernel(str, Enum):
    """Attention kernels (qimg.runtime.attention)."""

    auto = "auto"
    sdpa = "sdpa"
    cudnn = "cudnn"
    flash = "flash"
    sage = "sage"


class FP8Mode(str, Enum):
    """FP8 linears in the transformer blocks (qimg.runtime.fp8)."""

    compute = "compute"
    weights = "weights"


Attention = Annotated[
    AttentionKernel,
    typer.Option(help="Attention kernel: auto (flash-attn if installed, else cuDNN on CUDA), sdpa, cudnn, "
                 "flash (needs flash-attn), sage (needs sageattention)."),
]
Compile = Annotated[
    bool,
    typer.Option("--compile", help="compile the repeated transformer block (the first run for a new shape "
                 "compiles; later runs load the saved package from $QIMG_HOME/compile in milliseconds)."),
]
CudaGraphs = Annotated[
    bool,
    typer.Option("--cuda-graphs", help="replay the denoiser's forward from CUDA graphs: each step skips Python "
                 "and kernel launches (a GPU with the denoiser resident; keeps one forward's activation memory)."),
]
FP8 = Annotated[
    FP8Mode | None,
    typer.Option("--fp8", help="compute: run the block linears on FP8 tensor cores (Ada/Hopper GPUs); "
                 "weights: store them in FP8, compute in bf16 (also the text encoder's language model). "
                 "Default: off."),
]


class OffloadMode(str, Enum):
    """Where weights live between uses (qimg.runtime.offload, planned by qimg.runtime.planner)."""

    auto = "auto"
    none = "none"
    model = "model"
    layer = "layer"


class LoRAMode(str, Enum):
    """How --lora files apply (qimg.RuntimeOptions.lora_mode)."""

    auto = "auto"
    merge = "merge"
    branch = "branch"


class ParallelMode(str, Enum):
    """How one image is shared by several processes (qimg.RuntimeOptions.parallel)."""

    cfg = "cfg"
    seq = "seq"
    cfg_seq = "cfg+seq"


Parallel = Annotated[
    ParallelMode | None,
    typer.Option("--parallel",
                 help="One image on several GPUs (with --gpus N, or under torchrun): cfg: the prompt and negative "
                 "branches on 2 processes; seq: every process holds a share of the tokens (attention exchanges "
                 "them); cfg+seq: both, on 4, 6, 8, ... Same seed, same image as one GPU."),
]


class TextEncoderDevice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


Offload = Annotated[
    OffloadMode,
    typer.Option(help="none: everything on the GPU; model: one component (text encoder, transformer) on the GPU "
                 "at a time, the rest in pinned host memory; layer: also stream the transformer blocks that do "
                 "not fit, with prefetch; auto: the first that fits the free memory or --vram-budget."),
]
VramBudget = Annotated[
    float | None,
    typer.Option("--vram-budget", metavar="GIB",
                 help="GPU memory this run may use, in GiB: the plan fits it and the process is capped to it. "
                 "Default: the memory free when loading."),
]
TextEncoderPlace = Annotated[
    TextEncoderDevice | None,
    typer.Option("--text-encoder-device",
                 help="Run the text encoder on the CPU (saves its GPU memory, slower prompts) or the GPU. "
                 "Default: the GPU, within the memory plan."),
]
Guidance = Annotated[
    float | None,
    typer.Option(help="Distilled guidance fed to the model (FLUX.1: default 3.5; refused for models without "
                 "it). True CFG is --cfg with --negative."),
]
Verbose = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Also print the memory plan (what stays on the GPU, what streams, the "
                 "expected peak)."),
]


def runtime_options(
    device: str | None,
    dtype: DType | None,
    tiled_vae: bool = False,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    attention: AttentionKernel = AttentionKernel.auto,
    compile: bool = False,
    fp8: FP8Mode | None = None,
    offload: OffloadMode = OffloadMode.auto,
    vram_budget: float | None = None,
    text_encoder_device: TextEncoderDevice | None = None,
    lora_mode: LoRAMode = LoRAMode.auto,
    cuda_graphs: bool = False,
) -> qimg.RuntimeOptions:
    """The one RuntimeOptions object of a run; its own checks (and the tile sizes) fail here, before loading."""
    return qimg.RuntimeOptions(
        device=device,
        dtype=dtype.value if dtype else None,
        vae_tiling=tiling_from(tiled_vae, tile_size, tile_overlap),
        attention=attention.value,
        compile=compile,
        cuda_graphs=cuda_graphs,
        fp8=fp8.value if fp8 else None,
        offload=offload.value,
        vram_budget=vram_budget,
        text_encoder_device=text_encoder_device.value if text_encoder_device else None,
        lora_mode=lora_mode.value,
    )


# Options every command spells the same way.
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Debug = Annotated[
    bool, typer.Option("--debug", envvar="QIMG_DEBUG", help="Print the full traceback when something fails.")
]  # read by the error mapping in main.py (guarded), not by the command
Device = Annotated[
    str | None,
    typer.Option(callback=check_device, help="cpu, cuda or cuda:N. Default: cuda if present, else cpu."),
]
LoRA = Annotated[
    list[str] | None,
    typer.Option("--lora", metavar="PATH[:SCALE]",
                 help="Apply a LoRA at SCALE (default 1.0; 0 turns it off, negative subtracts it): a .safetensors "
                 "file in any dialect qimg reads, or OWNER/REPO/FILE.safetensors from the hub caches (qimg "
                 "download OWNER/REPO --file FILE fetches it). Repeat to stack several."),
]


LoRAModeOption = Annotated[
    LoRAMode,
    typer.Option("--lora-mode", help="merge: fold the LoRAs into the weights as the model loads (no per-step "
                 "cost; FP8 is quantised from bf16 + LoRA); branch: run them beside each linear (exact on any "
                 "base, switchable, ~15% per step at rank 64); auto: merge, except in prompt-file batches whose "
                 "lines change LoRAs and on FP8-stored --transformer files."),
]
TransformerOption = Annotated[
    Path | None,
    typer.Option("--transformer", metavar="FILE",
                 help="Transformer weights from one safetensors file (or a sharded release's folder or "
                 "*.safetensors.index.json) instead of the model folder's: the official key layout, ComfyUI's "
                 "(model.diffusion_model.) or, for FLUX.1, BFL's own (flux1-dev.safetensors), bf16 or FP8 "
                 "(e4m3fn, with or without scales, kept as FP8 storage). "
                 "The VAE, text encoder and configs still come from --model."),
]


# Built from qimg.PRESETS so that a new preset is one row of data, not one more edit here.
PresetName = Enum("PresetName", {name.replace("-", "_"): name for name in qimg.PRESETS}, type=str)  # type: ignore[misc]
PresetOption = Annotated[
    PresetName | None,
    typer.Option("--preset", help="Sampling settings a distilled LoRA or model was made for. lightning-8, "
                 "lightning-4: 8 or 4 steps, CFG off, shift ln 3 at every size, no terminal shift (the Lightning "
                 "LoRAs); distill: 15 steps, CFG off (Qwen-Image-Distill-Full). --steps and --cfg still win."),
]


def preset_from(value: Any) -> str | None:
    """The --preset value as the preset's name."""
    return None if value is None else str(value.value)


def loras_from(values: list[str] | None) -> list[tuple[str, float]]:
    """--lora values as (path, scale) pairs."""
    return [qimg.parse_lora(v) for v in values or []]
