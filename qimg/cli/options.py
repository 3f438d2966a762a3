"""Options shared by several commands: the model argument, device and dtype, and their checks."""

from __future__ import annotations

import re
from enum import Enum

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


def require_model(model: str | None) -> str:
    """The --model value, or a usage error naming both ways to give one."""
    if not model:
        raise qimg.UsageError(
            "no model given", hint=f"pass --model /path/to/Qwen-Image or set {MODEL_ENV}=/path/to/Qwen-Image"
        )
    return model
