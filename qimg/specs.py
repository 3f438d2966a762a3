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
class FluxParams:
    """FLUX.1 double + single stream transformer (defaults: the released FLUX.1-dev; schnell has no guidance).

    Field names are the config.json keys of diffusers' FluxTransformer2DModel; out_channels None means in_channels.
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


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
class FluxVAEParams:
    """FLUX.1's AutoencoderKL, 16 latent channels (defaults: FLUX.1-dev vae/config.json)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    mid_block_add_attention: bool = True

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class FlowSchedule:
    """FlowMatchEulerDiscrete settings (scheduler/scheduler_config.json) that shape the sigmas."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"


@dataclass(frozen=True)
class ModelSpec:
    """One released model: where it lives, how it is recognised, and its sampling defaults."""

    name: str
    family: str  # the families/ record that runs it: "qwen-image" (every Qwen model) or "flux"
    pipeline_class: str  # model_index.json _class_name that identifies the layout
    repos: dict[str, str] = field(default_factory=dict)  # source -> repo id
    steps: int = 50
    cfg: float = 4.0
    guidance: float | None = None  # distilled guidance scale fed to the model (FLUX.1-dev: 3.5); None: none
    negative: str | None = " "  # None: no negative prompt unless given (then true CFG stays off)
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 512
    # Official training resolutions (width, height), for users who ask for aspect presets.
    sizes: tuple[tuple[int, int], ...] = ()
    task: str = "t2i"  # "t2i": prompt only; "edit": prompt + condition images (seen by the VL encoder and the VAE)
    prompt_template: str = "qwen-image-t2i"  # a PromptTemplate.name in qimg/nets/text_encoders.py (Qwen family)
    # Condition images per edit: Edit takes exactly one (its template holds one placeholder); Edit-Plus takes
    # one or more (None: no fixed limit; the model card recommends 1 to 3).
    min_images: int = 0
    max_images: int | None = 0
    # Pixel areas the condition images are resized to (calculate_dimensions, keeping their aspect): one copy for the
    # VL encoder, one for the VAE; the output size defaults to the VAE area at the (last) image's aspect.
    vl_image_area: int = 0
    vae_image_area: int = 0
    # Edit models whose output keeps this pixel area whatever the input image (FLUX.1-Kontext: 1024^2; --width and
    # --height then set only the aspect); 0: the output follows the last input image's aspect at width x height.
    fixed_output_area: int = 0
    # Training resolutions (width, height) an input image is resized to, the one nearest its aspect (FLUX.1-Kontext);
    # empty: input images keep their aspect at vae_image_area.
    input_sizes: tuple[tuple[int, int], ...] = ()


QWEN_IMAGE_SIZES = (
    (1328, 1328), (1664, 928), (928, 1664), (1472, 1104), (1104, 1472), (1584, 1056), (1056, 1584),
)  # fmt: skip

# Edit-Plus (-2509, -2511): the VL encoder sees each image at ~384x384, the VAE at ~1024x1024.
_EDIT_PLUS = dict(task="edit", prompt_template="qwen-image-edit-plus", min_images=1, max_images=None,
                 vl_image_area=384 * 384, vae_image_area=1024 * 1024)

# FLUX.1-Kontext's training resolutions (width, height), as diffusers' PREFERRED_KONTEXT_RESOLUTIONS lists them.
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
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
    "qwen-image-edit": ModelSpec(
        name="qwen-image-edit",
        family="qwen-image",
        pipeline_class="QwenImageEditPipeline",
        repos={"hf": "Qwen/Qwen-Image-Edit", "modelscope": "Qwen/Qwen-Image-Edit"},
        task="edit",
        prompt_template="qwen-image-edit",
        min_images=1,
        max_images=1,
        vl_image_area=1024 * 1024,  # Edit hands the VL encoder the same resized image as the VAE
        vae_image_area=1024 * 1024,
    ),
    "qwen-image-edit-2509": ModelSpec(
        name="qwen-image-edit-2509",
        family="qwen-image",
        pipeline_class="QwenImageEditPlusPipeline",
        repos={"hf": "Qwen/Qwen-Image-Edit-2509", "modelscope": "Qwen/Qwen-Image-Edit-2509"},
        **_EDIT_PLUS,
    ),
    # Same pipeline and defaults as -2509; its transformer config sets zero_cond_t, which the loader reads.
    "qwen-image-edit-2511": ModelSpec(
        name="qwen-image-edit-2511",
        family="qwen-image",
        pipeline_class="QwenImageEditPlusPipeline",
        repos={"hf": "Qwen/Qwen-Image-Edit-2511", "modelscope": "Qwen/Qwen-Image-Edit-2511"},
        **_EDIT_PLUS,
    ),
    "flux-dev": ModelSpec(
        name="flux-dev",
        family="flux",
        pipeline_class="FluxPipeline",
        repos={"hf": "black-forest-labs/FLUX.1-dev", "modelscope": "black-forest-labs/FLUX.1-dev"},
        steps=28,
        cfg=1.0,  # true CFG off: FLUX.1-dev is guidance-distilled (--guidance); --cfg F --negative TEXT turns it on
        guidance=3.5,
        negative=None,
        prompt_template="flux-clip-t5",  # no template: the recipe FLUX embeddings files record
    ),
    "flux-kontext-dev": ModelSpec(
        name="flux-kontext-dev",
        family="flux",
        pipeline_class="FluxKontextPipeline",
        repos={"hf": "black-forest-labs/FLUX.1-Kontext-dev", "modelscope": "black-forest-labs/FLUX.1-Kontext-dev"},
        steps=28,
        cfg=1.0,
        guidance=3.5,
        negative=None,
        prompt_template="flux-clip-t5",  # no template: the recipe FLUX embeddings files record
        task="edit",
        min_images=1,
        max_images=1,
        fixed_output_area=1024 * 1024,
        input_sizes=KONTEXT_RESOLUTIONS,
    ),
}

# The most prompt tokens each family's text encoder reads (--max-sequence-length): Qwen2.5-VL's window the Qwen
# pipelines allow, and T5's 512 for FLUX.1 (diffusers refuses more).
PROMPT_TOKEN_LIMIT: dict[str, int] = {"qwen-image": 1024, "flux": 512}

# Explicit names only: a model is never guessed from a path or a hash.
ALIASES: dict[str, str] = {
    "Qwen/Qwen-Image": "qwen-image",
    "Qwen/Qwen-Image-2512": "qwen-image-2512",
    "Qwen/Qwen-Image-Edit": "qwen-image-edit",
    "Qwen/Qwen-Image-Edit-2509": "qwen-image-edit-2509",
    "Qwen/Qwen-Image-Edit-2511": "qwen-image-edit-2511",
    "black-forest-labs/FLUX.1-dev": "flux-dev",
    "black-forest-labs/FLUX.1-Kontext-dev": "flux-kontext-dev",
}

# Which spec a local model folder in the diffusers layout gets, by its model_index.json _class_name, unless a
# VARIANT_RULES entry below tells a later release apart by another of the folder's files.
SPEC_BY_PIPELINE_CLASS: dict[str, str] = {
    "QwenImagePipeline": "qwen-image",
    "QwenImageEditPipeline": "qwen-image-edit",
    "QwenImageEditPlusPipeline": "qwen-image-edit-2509",
    "FluxPipeline": "flux-dev",
    "FluxKontextPipeline": "flux-kontext-dev",
}


@dataclass(frozen=True)
class VariantRule:
    """A folder of `pipeline_class` whose `config` (a path inside the model folder) sets `key` to `value` is `spec`."""

    pipeline_class: str
    config: str
    key: str
    value: bool | int | float | str
    spec: str


# Tried in order, the first match wins. Edit-2509 and -2511 share a pipeline class; -2511's transformer config alone
# sets zero_cond_t true (diffusers_facts.md §1.1, §5.2).
VARIANT_RULES: tuple[VariantRule, ...] = (
    VariantRule("QwenImageEditPlusPipeline", "transformer/config.json", "zero_cond_t", True, "qwen-image-edit-2511"),
)

# spec a local folder resolves to -> specs a folder of which resolves the same way, because no file tells them
# apart: -2512 ships the same model_index.json class and the same transformer, VAE and scheduler configs as
# Qwen-Image (diffusers_facts.md §1.1, §2.1, §3.1); only its weights differ, and a model is never guessed from a
# folder name or a hash. Harmless while the specs differ only in name and repos (tests/loading/test_hub.py checks).
# The alias qwen-image-2512 still names its repos; only the spec read from the files is qwen-image.
INDISTINGUISHABLE_FROM: dict[str, tuple[str, ...]] = {
    "qwen-image": ("qwen-image-2512",),
}

# What `qimg download` fetches for each component folder, as glob patterns (fnmatch, the syntax of huggingface_hub's
# and ModelScope's allow_patterns). Weights are safetensors only: .bin/.pt/.ckpt copies are never fetched (qimg never
# unpickles), nor READMEs, example images or LICENSE files. Which components a model needs depends on its task
# (COMPONENTS_BY_TASK in qimg/loading/hub.py); model_index.json is always fetched.
MODEL_INDEX_FILE = "model_index.json"
DOWNLOAD_PATTERNS: dict[str, tuple[str, ...]] = {
    "transformer": ("transformer/*.json", "transformer/*.safetensors"),
    "vae": ("vae/*.json", "vae/*.safetensors"),
    "text_encoder": ("text_encoder/*.json", "text_encoder/*.safetensors"),
    "tokenizer": ("tokenizer/*.json", "tokenizer/*.txt", "tokenizer/*.jinja"),
    "scheduler": ("scheduler/*.json",),
    # Edit models: the Qwen2-VL image processor (its settings, and a copy of the tokenizer with its chat template).
    "processor": ("processor/*.json", "processor/*.txt", "processor/*.jinja"),
    # FLUX.1: T5-XXL and its tokenizer (tokenizer.json, and the sentencepiece model it was made from).
    "text_encoder_2": ("text_encoder_2/*.json", "text_encoder_2/*.safetensors"),
    "tokenizer_2": ("tokenizer_2/*.json", "tokenizer_2/*.model"),
}
