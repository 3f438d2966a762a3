"""Variants as data: network parameters and the model specs that qimg knows by name."""

from __future__ import annotations

from dataclasses import dataclass, field

# Qwen-Image VAE per-channel latent statistics (vae/config.json latents_mean / latents_std).
QWEN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
QWEN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class QwenMMDiTParams:
    """Qwen-Image double-stream MMDiT (defaults: the released 20B model)."""

    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128
    txt_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    zero_cond_t: bool = False

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class QwenVAEParams:
    """Wan-2.1-style VAE of Qwen-Image (defaults: the released model)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    latents_mean: tuple[float, ...] = QWEN_LATENTS_MEAN
    latents_std: tuple[float, ...] = QWEN_LATENTS_STD

    @property
    def scale_factor(self) -> int:
        return 2 ** len(self.temporal_downsample)


@dataclass(frozen=True)
class ModelSpec:
    """One released model: where it lives, how it is recognised, and its sampling defaults."""

    name: str
    family: str  # "qwen-image" (text-to-image); later "qwen-image-edit", "flux"
    pipeline_class: str  # model_index.json _class_name that identifies the layout
    repos: dict[str, str] = field(default_factory=dict)  # source -> repo id
    steps: int = 50
    cfg: float = 4.0
    negative: str = " "
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 512
    # Official training resolutions (width, height), for users who ask for aspect presets.
    sizes: tuple[tuple[int, int], ...] = ()


QWEN_IMAGE_SIZES = (
    (1328, 1328), (1664, 928), (928, 1664), (1472, 1104), (1104, 1472), (1584, 1056), (1056, 1584),
)  # fmt: skip

SPECS: dict[str, ModelSpec] = {
    "qwen-image": ModelSpec(
        name="qwen-image",
        family="qwen-image",
        pipeline_class="QwenImagePipeline",
        repos={"hf": "Qwen/Qwen-Image", "modelscope": "Qwen/Qwen-Image"},
        sizes=QWEN_IMAGE_SIZES,
    ),
    "qwen-image-2512": ModelSpec(
        name="qwen-image-2512",
        family="qwen-image",
        pipeline_class="QwenImagePipeline",
        repos={"hf": "Qwen/Qwen-Image-2512", "modelscope": "Qwen/Qwen-Image-2512"},
        sizes=QWEN_IMAGE_SIZES,
    ),
}

# Explicit names only: a model is never guessed from a path or a hash.
ALIASES: dict[str, str] = {
    "Qwen/Qwen-Image": "qwen-image",
    "Qwen/Qwen-Image-2512": "qwen-image-2512",
}

# Which spec a local model folder in the diffusers layout gets, by its model_index.json _class_name.
# Qwen-Image and -2512 share one pipeline class and one set of defaults.
SPEC_BY_PIPELINE_CLASS: dict[str, str] = {"QwenImagePipeline": "qwen-image"}
