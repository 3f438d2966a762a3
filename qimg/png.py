"""Image files: PNG output with parameters as text chunks, written atomically (temporary file + rename), and
image input that fails with one clear line."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from qimg.errors import InputError, OutputError

PARAMS_KEY = "qimg"  # one iTXt chunk with every parameter as JSON; single keys are written beside it for other tools


def check_output_path(path: str | Path, *, overwrite: bool = False, suffix: str = ".png") -> Path:
    """Fail early, before any work, if `path` cannot be written (missing folder, not writable, exists)."""
    out = Path(path).expanduser()
    if out.suffix.lower() != suffix:
        raise OutputError(f"{out} does not end in {suffix}", hint=f"name the output *{suffix}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist", hint=f"create it first: mkdir -p {parent}")
    # A real probe, not os.access: root passes permission checks, yet read-only or virtual filesystems refuse.
    try:
        fd, probe = tempfile.mkstemp(prefix=".qimg-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"output folder {parent} is not writable ({e.strerror})", hint="choose another -o path"
        ) from e
    if out.is_dir():
        raise OutputError(f"{out} is a folder", hint="give a file name ending in .png")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another -o path")
    return out


def save_png(image: Any, path: str | Path, params: dict[str, Any] | None = None, *, overwrite: bool = False) -> Path:
    """Write a PIL image as PNG with `params` (default: image.info["qimg"]) in text chunks; atomic, no partial file."""
    from PIL.PngImagePlugin import PngInfo

    out = check_output_path(path, overwrite=overwrite)
    params = dict(params if params is not None else image.info.get(PARAMS_KEY, {}))
    info = PngInfo()
    for key, value in params.items():
        info.add_itxt(key, "" if value is None else str(value))
    info.add_itxt(PARAMS_KEY, json.dumps(params, ensure_ascii=False, sort_keys=True))
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and out.exists():
            raise OutputError(f"{out} appeared while generating", hint="pass --overwrite to replace it")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def read_params(path: str | Path) -> dict[str, Any]:
    """The parameters qimg stored in a PNG (empty if the file carries none)."""
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", {}) or {}
        raw = text.get(PARAMS_KEY)
    return json.loads(raw) if raw else {}


def open_image(path: str | Path, what: str = "image") -> Any:
    """Open an image file fully (so a truncated file fails now, not halfway through a run) as RGB or L."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{what} {p} does not exist", hint="check the path")
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{what} {p} is not a readable image ({e})", hint="use a PNG, JPEG or WebP file") from e
