"""A generation request: defaults from the model spec, validated and snapped before any model is loaded."""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, replace
from typing import Any

from qimg.errors import InputError, QimgError
from qimg.presets import get_preset
from qimg.runtime.planner import RequestShape
from qimg.specs import PROMPT_TOKEN_LIMIT, FlowSchedule, ModelSpec

MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_SEQUENCE_LENGTH = 1024  # the Qwen-Image text encoder window the pipelines allow
MAX_SIDE = 8192
MAX_GUIDANCE = 100.0
# The schedule has 1000 training timesteps: more steps than that only repeat sigmas, and an unbounded count
# grows memory (the sigma table, the progress bar) until the machine gives out.
MAX_STEPS = 1000
# True CFG scales a difference of velocities: past ~20 images burn, and a huge finite value overflows to inf.
MAX_CFG = 100.0
DEFAULT_STRENGTH = 0.6  # img2img: keeps the layout, changes the look


@dataclass(frozen=True)
class GenerateRequest:
    """Everything that determines a text-to-image result, after defaults and snapping."""

    prompt: str
    negative: str | None
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    max_sequence_length: int
    strength: float | None = None  # img2img: how much of the schedule runs (None: text to image from noise)
    guidance: float | None = None  # distilled guidance fed to the model (FLUX.1-dev); None: the family has none
    preset: str | None = None  # the preset whose settings it took (presets.py), recorded for people and replays
    # FlowSchedule fields the preset overrides, (field, value) pairs; () runs the model's own schedule
    schedule: tuple[tuple[str, Any], ...] = ()

    @property
    def cfg_enabled(self) -> bool:
        """Qwen's true CFG runs only with a negative prompt and a scale above 1."""
        return self.negative is not None and self.cfg > 1.0

    def flow_schedule(self, base: FlowSchedule) -> FlowSchedule:
        """The model's schedule with this request's overrides."""
        return replace(base, **dict(self.schedule)) if self.schedule else base

    def as_dict(self) -> dict:
        out = asdict(self)
        out["schedule"] = dict(self.schedule)  # JSON-friendly in the PNG; {} for the model's own
        return out


def check_task(spec: ModelSpec, name: str, task: str, error: type[QimgError] = InputError) -> None:
    """Refuse a call the model cannot serve: text to image on an edit model, or an edit on a text-to-image one.
    The CLI's jobs raise it as a usage error (exit 2); a pipeline called directly, as an input error."""
    if spec.task == task:
        return
    if task == "t2i":
        raise error(f"{name} is an edit model", hint="use: qimg edit PROMPT -i IMAGE -o OUT.png")
    raise error(f"{name} is a text-to-image model", hint="use: qimg generate PROMPT -o OUT.png, or an edit model")


def check_images(spec: ModelSpec, name: str, n_images: int, error: type[QimgError] = InputError) -> None:
    """Refuse a number of input images the model cannot take (text-to-image models take none)."""
    if spec.task != "edit":
        if n_images:
            raise error(f"{name} is a text-to-image model; it takes no input images",
                        hint="use an edit model (Qwen-Image-Edit, -2509, -2511) for -i IMAGE")
        return
    most = "any number of" if spec.max_images is None else f"at most {spec.max_images}"
    if n_images < spec.min_images or (spec.max_images is not None and n_images > spec.max_images):
        raise error(f"{spec.name} takes {spec.min_images} to {most} input images, got {n_images}",
                    hint="pass each image with -i IMAGE")


def without_negative(request: GenerateRequest, embeddings: Any = None, no_negative: bool = False) -> GenerateRequest:
    """CFG off when there is nothing to guide against: saved prompt embeddings without a negative, or (no_negative)
    a replayed image that was made without one."""
    if no_negative or (embeddings is not None and embeddings.uncond is None):
        return replace(request, negative=None)
    return request


def request_shape(spec: ModelSpec, request: GenerateRequest, n_images: int = 0, embeddings: bool = False
                  ) -> RequestShape:
    """The memory shape of a request: its size, CFG, its reference images' pixels (at the spec's VAE area) and
    whether prompts are encoded (not from saved embeddings)."""
    return RequestShape(width=request.width, height=request.height, cfg=request.cfg_enabled,
                        ref_pixels=spec.vae_image_area * n_images, text_encoder=not embeddings)


def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about target_area pixels at aspect ratio width/height, multiples of 32 (Qwen pipelines)."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first schedule step an img2img run takes (the earlier, noisier ones are skipped)."""
    return int(max(steps - min(steps * strength, steps), 0))


def _snap(value: int, name: str, notes: list[str]) -> int:
    if value < 16 or value > MAX_SIDE:
        raise InputError(f"{name} {value} is out of range", hint=f"use a {name} between 16 and {MAX_SIDE} pixels")
    snapped = value // 16 * 16
    if snapped != value:
        notes.append(f"{name} {value} is not a multiple of 16; using {snapped}")
    return snapped


def _strength(strength: float | None, steps: int) -> float | None:
    if strength is None:
        return None
    if not (math.isfinite(strength) and 0 < strength <= 1):
        raise InputError(f"--strength must be in (0, 1] (got {strength})", hint="0.6 keeps the layout, 1.0 redraws")
    if steps - img2img_start(steps, strength) < 1:
        raise InputError(f"--strength {strength} with --steps {steps} leaves no step to run",
                         hint="raise --strength or --steps")
    return strength


def _guidance(spec: ModelSpec, guidance: float | None) -> float | None:
    """The distilled guidance of a request: the spec's default, refused for families that have none."""
    if guidance is not None and spec.guidance is None:
        raise InputError(f"{spec.name} has no distilled guidance", hint="leave --guidance off; --cfg sets true CFG")
    guidance = spec.guidance if guidance is None else guidance
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise InputError(f"--guidance must be between 0 and {MAX_GUIDANCE:g} (got {guidance})",
                         hint=f"the model's default is {spec.guidance}")
    return guidance


def input_size(spec: ModelSpec, width: int, height: int) -> tuple[int, int]:
    """The size an input image is encoded at for a spec with training resolutions (FLUX.1-Kontext, as diffusers'
    FluxKontextPipeline with _auto_resize): the image's size floored to 16, then the resolution nearest that
    aspect (ties to the narrower), floored to 16. Specs without them: the image's own size."""
    if not spec.input_sizes:
        return width, height
    w, h = width - width % 16, height - height % 16
    if w < 16 or h < 16:
        raise InputError(f"the input image is {width}x{height}; {spec.name} needs at least 16x16")
    _, w, h = min((abs(w / h - rw / rh), rw, rh) for rw, rh in spec.input_sizes)
    return w - w % 16, h - h % 16


def make_request(
    spec: ModelSpec,
    prompt: str,
    *,
    negative: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    width: int | None = None,
    height: int | None = None,
    max_sequence_length: int | None = None,
    strength: float | None = None,
    init_size: tuple[int, int] | None = None,
    img2img: bool = False,
    guidance: float | None = None,
    preset: str | None = None,
) -> tuple[GenerateRequest, list[str]]:
    """Fill defaults from the spec and validate; returns the request and human notes (snapping) to show.

    init_size (width, height) of an init image (img2img) or the last input image (edit): without
    --width/--height the output keeps its aspect at the model's default area (as the edit pipelines do),
    rather than being squashed to a square. img2img: the request starts from an init image, so strength
    defaults to DEFAULT_STRENGTH. guidance: distilled guidance, for specs that have it (default: the spec's).
    preset: a name in presets.PRESETS; its steps and cfg stand in for the spec's defaults (explicit values still
    win) and its schedule overrides go with the request.
    """
    notes: list[str] = []
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty", hint="give a prompt, e.g. qimg generate \"a red fox\" -o fox.png")
    bound = None
    if preset is not None:
        try:
            bound = get_preset(preset)
        except ValueError as e:
            raise InputError(str(e), hint="see qimg generate --help") from None
        steps = bound.steps if steps is None else steps
        cfg = bound.cfg if cfg is None else cfg
    steps = spec.steps if steps is None else steps
    if not 1 <= steps <= MAX_STEPS:
        raise InputError(f"--steps must be between 1 and {MAX_STEPS} (got {steps})",
                         hint=f"the model's default is {spec.steps}")
    cfg = spec.cfg if cfg is None else cfg
    if not (math.isfinite(cfg) and 0 <= cfg <= MAX_CFG):
        raise InputError(f"--cfg must be between 0 and {MAX_CFG:g} (got {cfg})",
                         hint=f"the model's default is {spec.cfg}")
    if seed is None:
        seed = secrets.randbits(32)
    elif not 0 <= seed <= MAX_SEED:
        raise InputError(f"--seed must be between 0 and {MAX_SEED} (got {seed})")
    msl = spec.max_sequence_length if max_sequence_length is None else max_sequence_length
    longest = PROMPT_TOKEN_LIMIT.get(spec.family, MAX_SEQUENCE_LENGTH)
    if not 1 <= msl <= longest:
        raise InputError(f"max_sequence_length must be between 1 and {longest} (got {msl})",
                         hint=f"{spec.name}'s text encoder reads at most {longest} prompt tokens")
    strength = _strength(DEFAULT_STRENGTH if img2img and strength is None else strength, steps)
    guidance = _guidance(spec, guidance)
    if spec.input_sizes and init_size is not None:
        size = input_size(spec, *init_size)
        if size != tuple(init_size):
            notes.append(f"the input image ({init_size[0]}x{init_size[1]}) is resized to {size[0]}x{size[1]}, the "
                         f"{spec.name} training resolution nearest its aspect")
    if spec.fixed_output_area:
        # FLUX.1-Kontext (diffusers' FluxKontextPipeline): the output keeps the area; the size asked for (default
        # square) sets only the aspect; sides rounded, then floored to 16.
        asked_w, asked_h = width or spec.width, height or spec.height
        aspect = asked_w / asked_h
        width = round((spec.fixed_output_area * aspect) ** 0.5) // 16 * 16
        height = round((spec.fixed_output_area / aspect) ** 0.5) // 16 * 16
        if (width, height) != (asked_w, asked_h):
            notes.append(f"{spec.name} makes {width}x{height} images (about {spec.fixed_output_area // 2**20} MP at "
                         f"the {asked_w}:{asked_h} aspect), not {asked_w}x{asked_h}")
    elif init_size is not None and (width is None or height is None):
        fit_w, fit_h = calculate_dimensions(spec.width * spec.height, init_size[0] / init_size[1])
        width, height = width or fit_w, height or fit_h
    request = GenerateRequest(
        prompt=prompt,
        negative=spec.negative if negative is None else negative,
        seed=seed,
        steps=steps,
        cfg=cfg,
        width=_snap(spec.width if width is None else width, "width", notes),
        height=_snap(spec.height if height is None else height, "height", notes),
        max_sequence_length=msl,
        strength=strength,
        guidance=guidance,
        preset=preset,
        schedule=bound.schedule if bound is not None else (),
    )
    return request, notes
