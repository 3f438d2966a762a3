"""Presets: the sampling settings a distilled model or LoRA was trained for, bound under one name.

A distilled LoRA run with the base model's settings gives rainbow noise or mush (users.md item 9): Lightning
was distilled at a fixed shift of 3 with CFG off, so it needs base_shift = max_shift = ln 3 (mu = ln 3 at any size)
and no terminal stretch (Qwen-Image-2512 ships shift_terminal 0.02), as the releases' scheduler configs say
(ModelTC/Qwen-Image-Lightning generate_with_diffusers.py; the Edit, -2509 and -2511 releases use the same one).
DiffSynth's Qwen-Image-Distill-Full runs 15 steps with CFG off on the base schedule.

Explicit --steps and --cfg win over a preset; its schedule overrides have no flags of their own. Torch-free data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

LN3 = math.log(3)


@dataclass(frozen=True)
class Preset:
    """Sampling settings that go with a distilled model or LoRA."""

    name: str
    steps: int
    cfg: float  # 1.0: one model call per step (Qwen's true CFG runs only above 1)
    # FlowSchedule fields it overrides, as (field, value) pairs (frozen and hashable, like the request)
    schedule: tuple[tuple[str, float | bool | str | None], ...]
    schedule_text: str  # the overrides in words ("" for none)
    goes_with: str  # what to load with it, for --help and hints

    def describe(self) -> str:
        """One line for --verbose: what it binds."""
        parts = [f"{self.steps} steps", "CFG off" if self.cfg <= 1 else f"CFG {self.cfg:g}"]
        return f"preset {self.name}: " + ", ".join(parts + ([self.schedule_text] if self.schedule_text else []))


# The Lightning releases' FlowMatchEulerDiscreteScheduler config, as overrides of the model's own.
_LIGHTNING_SCHEDULE: tuple[tuple[str, float | bool | str | None], ...] = (
    ("use_dynamic_shifting", True), ("base_shift", LN3), ("max_shift", LN3), ("shift_terminal", None),
    ("time_shift_type", "exponential"),  # listed so that no model config can differ
)
_LIGHTNING_TEXT = f"shift ln 3 at every size (base_shift = max_shift = {LN3:.4f}), no terminal shift"

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("lightning-8", 8, 1.0, _LIGHTNING_SCHEDULE, _LIGHTNING_TEXT,
           "a Lightning 8-step LoRA (lightx2v/Qwen-Image-Lightning, its Edit, -2509 and -2511 releases)"),
    Preset("lightning-4", 4, 1.0, _LIGHTNING_SCHEDULE, _LIGHTNING_TEXT,
           "a Lightning 4-step LoRA (lightx2v/Qwen-Image-Lightning, its Edit, -2509 and -2511 releases)"),
    Preset("distill", 15, 1.0, (), "",
           "a distilled transformer such as DiffSynth's Qwen-Image-Distill-Full (--transformer FILE)"),
)}


def get_preset(name: str) -> Preset:
    """The preset of that name; ValueError naming the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


_LIGHTNING_NAME = re.compile(r"lightning", re.IGNORECASE)
_STEPS_IN_NAME = re.compile(r"(?<![0-9])([0-9]+)[-_ ]?steps?(?![a-z])", re.IGNORECASE)


def suggest_preset(path: str | Path) -> str | None:
    """The preset a LoRA file's own name asks for ("Qwen-Image-Lightning-8steps-V1.1.safetensors" -> lightning-8),
    or None when its name says nothing of the kind."""
    name = Path(path).name
    if not _LIGHTNING_NAME.search(name):
        return None
    steps = _STEPS_IN_NAME.search(name)
    wanted = f"lightning-{steps.group(1)}" if steps else "lightning-8"
    return wanted if wanted in PRESETS else "lightning-8"
