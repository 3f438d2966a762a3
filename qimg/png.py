"""Image files: PNG output with parameters as text chunks, written atomically (temporary file + rename), and
image input that fails with one clear line."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from qimg.errors import InputError, OutputError

PARAMS_KEY = "qimg"  # one iTXt chunk with every parameter as JSON; single keys are written beside it for other tools
A1111_KEY = "parameters"  # the chunk AUTOMATIC1111 and the tools that copy it read


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
        raise OutputError(f"{out} is a folder", hint=f"give a file name ending in {suffix}")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another -o path")
    return out


def save_png(image: Any, path: str | Path, params: dict[str, Any] | None = None, *, overwrite: bool = False) -> Path:
    """Write a PIL image as PNG with `params` (default: image.info["qimg"]) in text chunks; atomic, no partial file.

    Besides the qimg JSON chunk and one chunk per key, an A1111-style `parameters` chunk lets other tools
    (image viewers, web UIs, model-sharing sites) show the prompt and seed."""
    from PIL.PngImagePlugin import PngInfo

    out = check_output_path(path, overwrite=overwrite)
    params = dict(params if params is not None else image.info.get(PARAMS_KEY, {}))
    info = PngInfo()
    for key, value in params.items():
        info.add_itxt(key, "" if value is None else str(value))
    info.add_itxt(PARAMS_KEY, json.dumps(params, ensure_ascii=False, sort_keys=True))
    if "prompt" in params and A1111_KEY not in params:
        info.add_text(A1111_KEY, a1111_parameters(params))  # tEXt when Latin-1, else iTXt (as A1111 does)
    return write_atomic(out, lambda f: image.save(f, format="PNG", pnginfo=info), overwrite=overwrite)


def write_atomic(out: Path, write: Callable[[BinaryIO], Any], *, overwrite: bool = False) -> Path:
    """Write a file whole or not at all: `write` fills a temporary file beside `out`, which is synced and then
    renamed over `out`; any failure or interrupt removes the temporary and leaves `out` as it was."""
    fd, tmp = _open_temporary(out)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and out.exists():
            raise OutputError(f"{out} appeared while qimg was working", hint="pass --overwrite to replace it")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _open_temporary(out: Path) -> tuple[int, str]:
    """A new file beside `out` (same filesystem, so os.replace is atomic), named .NAME.<random>.tmp, which
    safety.remove_stale_temporaries relies on after a killed run. Not tempfile.mkstemp: its files are 0600,
    and os.replace would hand that mode to the image; os.open with 0o666 lets the umask decide, as for any
    file the user writes."""
    folder = out.parent if str(out.parent) else Path(".")
    while True:
        tmp = folder / f".{out.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue


def _a1111_quote(value: Any) -> str:
    """A1111's infotext quoting: values holding a comma, colon or newline become JSON strings."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_parameters(params: dict[str, Any]) -> str:
    """The A1111 `parameters` text: the prompt, a "Negative prompt:" line when there is one, then one line of
    "Key: value" pairs. Qwen's default negative (a single space) is no negative to a reader, so it is left out;
    the sampler is flow-matching Euler."""
    text = str(params.get("prompt", ""))
    negative = params.get("negative")
    if negative is not None and str(negative).strip():
        text += f"\nNegative prompt: {negative}"
    model = params.get("model")
    pairs = {
        "Steps": params.get("steps"),
        "Sampler": "Euler",
        "CFG scale": params.get("cfg"),
        "Seed": params.get("seed"),
        "Size": f"{params['width']}x{params['height']}" if "width" in params and "height" in params else None,
        "Model": (Path(str(model)).name or str(model)) if model else None,  # a folder's name, as A1111 shows
        "Denoising strength": params.get("strength"),
        "Version": f"qimg {params['qimg_version']}" if params.get("qimg_version") else None,
    }
    line = ", ".join(f"{key}: {_a1111_quote(value)}" for key, value in pairs.items() if value is not None)
    return f"{text}\n{line}".strip()


def read_params(path: str | Path) -> dict[str, Any]:
    """The parameters qimg stored in a PNG (empty if the image carries none); a missing or unreadable file, or a
    damaged chunk, is an InputError."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{p} does not exist" if not p.exists() else f"{p} is not a file", hint="check the path")
    try:
        with Image.open(p) as im:
            # info holds the text chunks before the pixels, where save_png puts them: no need to decode the image.
            raw = im.info.get(PARAMS_KEY)
            if raw is None and im.format == "PNG":
                raw = (getattr(im, "text", None) or {}).get(PARAMS_KEY)  # chunks after the pixels (other writers)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{p} is not a readable image ({e})", hint="give a PNG written by qimg") from e
    if not raw:
        return {}
    try:
        params = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{p} has a damaged qimg parameter chunk ({e})") from e
    if not isinstance(params, dict):
        raise InputError(f"{p} has a damaged qimg parameter chunk (not a JSON object)")
    return params


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
