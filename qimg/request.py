"""A generation request: defaults from the model spec, validated and snapped before any model is loaded."""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass

from qimg.errors import InputError
from qimg.specs import ModelSpec

MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_SEQUENCE_LENGTH = 1024  # the Qwen-Image text encoder window the pipelines allow
MAX_SIDE = 8192


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

    @property
    def cfg_enabled(self) -> bool:
        """Qwen's true CFG runs only with a negative prompt and a scale above 1."""
        return self.negative is not None and self.cfg > 1.0

    def as_dict(self) -> dict:
        return asdict(self)


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
) -> tuple[GenerateRequest, list[str]]:
    """Fill defaults from the spec and validate; returns the request and human notes (snapping) to show.

    init_size (width, height) of an img2img init image: without --width/--height the output keeps its aspect
    at the model's default area (as the edit pipelines do), rather than being squashed to a square.
    """
    notes: list[str] = []
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty", hint="give a prompt, e.g. qimg generate \"a red fox\" -o fox.png")
    steps = spec.steps if steps is None else steps
    if steps <= 0:
        raise InputError(f"--steps must be at least 1 (got {steps})", hint=f"the model's default is {spec.steps}")
    cfg = spec.cfg if cfg is None else cfg
    if not math.isfinite(cfg) or cfg < 0:
        raise InputError(f"--cfg must be a finite number >= 0 (got {cfg})", hint=f"the model's default is {spec.cfg}")
    if seed is None:
        seed = secrets.randbits(32)
    elif not 0 <= seed <= MAX_SEED:
        raise InputError(f"--seed must be between 0 and {MAX_SEED} (got {seed})")
    msl = spec.max_sequence_length if max_sequence_length is None else max_sequence_length
    if not 1 <= msl <= MAX_SEQUENCE_LENGTH:
        raise InputError(f"max_sequence_length must be between 1 and {MAX_SEQUENCE_LENGTH} (got {msl})")
    if strength is not None:
        if not (math.isfinite(strength) and 0 < strength <= 1):
            raise InputError(f"--strength must be in (0, 1] (got {strength})", hint="0.6 keeps the layout, 1.0 redraws")
        if steps - img2img_start(steps, strength) < 1:
            raise InputError(
                f"--strength {strength} with --steps {steps} leaves no step to run",
                hint="raise --strength or --steps",
            )
    if init_size is not None and (width is None or height is None):
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
    )
    return request, notes
