"""Image files: PNG output with parameters as text chunks, written atomically (temporary file + rename), and
image input that fails with one clear line."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from qimg.errors import InputError, OutputError

PARAMS_KEY = "qimg"  # one iTXt chunk with every parameter as JSON; single keys are written beside it for other tools
A1111_KEY = "parameters"  # the chunk AUTOMATIC1111 and the tools that copy it read


# Free-text parameters, which can be long: stored in the qimg JSON chunk and the A1111 text only.
_TEXT_KEYS = ("prompt", "negative")


def check_output_path(path: str | Path, *, overwrite: bool = False, suffix: str = ".png") -> Path:
    """Fail early, before any work, if `path` cannot be written (missing folder, not writable, exists, a name
    the filesystem or a shell script would trip on). A symbolic link is written through: its target is replaced,
    the link stays. Returns the path to write."""
    out = Path(path).expanduser()
    if any(ord(c) < 32 or c == "\x7f" for c in str(out)):
        raise OutputError(f"the output name {str(out)!r} holds control characters (newline, tab, ...)",
                          hint="choose a plain file name")
    if out.name.lower() == suffix:
        raise OutputError(f"{out} has no file name before {suffix}", hint=f"e.g. -o image{suffix}")
    if out.suffix.lower() != suffix:
        raise OutputError(f"{out} does not end in {suffix}", hint=f"name the output *{suffix}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.is_dir():
        _check_name_length(out, parent)  # before anything stats the path itself (a long name fails that too)
    if out.is_symlink():
        out = out.resolve()  # write the file the link points at (os.replace on the link would replace the link)
        parent = out.parent
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


def _check_name_length(out: Path, parent: Path) -> None:
    """The file name, and the temporary written beside it (.NAME.xxxxxxxx.tmp), must fit the filesystem."""
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    length = len(f".{out.name}.00000000.tmp".encode())
    if length > limit:
        raise OutputError(f"the output name {out.name[:40]}... is {len(out.name.encode())} bytes; this folder "
                          f"takes names of at most {limit - 14}", hint="choose a shorter -o name")


def save_png(image: Any, path: str | Path, params: dict[str, Any] | None = None, *, overwrite: bool = False) -> Path:
    """Write a PIL image as PNG with `params` (default: image.info["qimg"]) in text chunks; atomic, no partial file.

    Besides the qimg JSON chunk and one chunk per key, an A1111-style `parameters` chunk lets other tools
    (image viewers, web UIs, model-sharing sites) show the prompt and seed."""
    from PIL.PngImagePlugin import PngInfo

    out = check_output_path(path, overwrite=overwrite)
    params = dict(params if params is not None else image.info.get(PARAMS_KEY, {}))
    info = PngInfo()
    for key, value in params.items():
        if key not in _TEXT_KEYS:  # the prompts live in the JSON chunk and the A1111 text, not a third time
            info.add_itxt(key, "" if value is None else str(value))
    data = json.dumps(params, ensure_ascii=False, sort_keys=True)
    info.add_itxt(PARAMS_KEY, data, zip=len(data) > 1024)  # long prompts compress well
    if "prompt" in params and A1111_KEY not in params:
        text = a1111_parameters(params)
        # tEXt when Latin-1, else iTXt (as A1111 does); compressed when long (readers such as PIL inflate it).
        info.add_text(A1111_KEY, text, zip=len(text) > 1024)
    return write_atomic(out, lambda f: image.save(f, format="PNG", pnginfo=info), overwrite=overwrite)


def write_atomic(out: Path, write: Callable[[BinaryIO], Any], *, overwrite: bool = False) -> Path:
    """Write a file whole or not at all: `write` fills a temporary file beside `out`, which is synced and then
    renamed over `out`; any failure or interrupt removes the temporary and leaves `out` as it was."""
    try:
        fd, tmp = _open_temporary(out)
    except OSError as e:
        raise _write_error(out, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and out.exists():
            raise OutputError(f"{out} appeared while qimg was working", hint="pass --overwrite to replace it")
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(out, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _write_error(out: Path, e: OSError) -> OutputError:
    """An ordinary I/O failure (disk full, quota, a vanished folder) as one line; nothing was written."""
    hint = ("free some disk space or write to another folder" if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check the output folder, or choose another -o path")
    return OutputError(f"could not write {out}: {e.strerror or e}", hint=hint)


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
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # SyntaxError: PIL's "broken PNG file" while it reads the chunks after the pixels. DecompressionBombError:
        # a header claiming more pixels than PIL will open. Both are damaged (or hostile) files.
        raise InputError(f"{p} is not a readable image ({e})", hint="give a PNG written by qimg") from e
    if not raw:
        return {}
    again = "the file was changed by another program; use a PNG as qimg wrote it"
    try:
        params = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{p} has a damaged qimg parameter chunk ({e})", hint=again) from e
    except RecursionError:  # "[[[[..." nested past the recursion limit
        raise InputError(f"{p} has a damaged qimg parameter chunk (JSON nested too deeply)", hint=again) from None
    if not isinstance(params, dict):
        raise InputError(f"{p} has a damaged qimg parameter chunk (not a JSON object)", hint=again)
    return params


# The most pixels qimg reads from one input file: PIL's own refusal point, twice Image.MAX_IMAGE_PIXELS (179 MP,
# about 13377x13377, by default; it follows a program's own setting of MAX_IMAGE_PIXELS). Every input is resized
# to about 1 MP for the model, so no picture needs more, while a 150 MP camera still fits; a file claiming more is
# a mistake or a decompression bomb, and decoding it would take gigabytes first. Between PIL's warning threshold
# and this limit the image is read without PIL's raw DecompressionBombWarning.
def max_pixels() -> int | None:
    """The pixel limit for input images (None: the program turned PIL's check off)."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # what PIL gives for a 16-bit grayscale PNG or TIFF


def _pixels(n: int) -> str:
    return f"{n / 1e6:.1f} MP" if n >= 100_000 else f"{n} px"


def _open(path: str | Path, what: str) -> tuple[Any, Path, int]:
    """The file's first frame, fully read; its path and number of frames. Every failure is one InputError."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{what} {p} does not exist", hint="check the path")
    try:
        with warnings.catch_warnings():
            # Below max_pixels() an image is fine to read; PIL's warning would only be noise on the terminal.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                frames = getattr(im, "n_frames", 1)
                im.load()
                return im.copy(), p, frames
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))  # PIL says how many, not the width and height
        limit = max_pixels() or 0
        raise InputError(f"{what} {p} is {_pixels(int(pixels.group(1))) if pixels else 'too large'}, over qimg's "
                         f"limit of {_pixels(limit)} (about {int(limit**0.5)}x{int(limit**0.5)})",
                         hint="resize it first; qimg works at about 1 MP anyway") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{what} {p} is not a readable image ({e})", hint="use a PNG, JPEG or WebP file") from e


def open_image(path: str | Path, what: str = "image") -> Any:
    """Open an image file fully (so a truncated file fails now, not halfway through a run), as stored: EXIF
    orientation, alpha and 16 bits untouched (read_image gives what a pipeline takes). Too large a file (see
    max_pixels) is an InputError."""
    return _open(path, what)[0]


def conform_image(image: Any, mode: str = "RGB", *, subject: str = "the image") -> tuple[Any, list[str]]:
    """A PIL image upright (EXIF orientation) in `mode` ("RGB", or "L" for masks), 16-bit samples scaled to 8
    bits (not clipped); notes, one line each, say what was changed or dropped (`subject` names the image)."""
    import warnings

    import numpy as np
    from PIL import Image, ImageOps

    notes: list[str] = []
    if image.getexif().get(0x0112, 1) != 1:  # the Orientation tag: viewers show the photo turned
        image = ImageOps.exif_transpose(image)
        notes.append(f"turned {subject} upright as its EXIF orientation asks")
    if image.mode in _SIXTEEN_BIT:  # convert() would clip 0..65535 to 255: a near-white picture
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))  # mode L
    if image.mode != mode:
        if "A" in image.getbands() or "transparency" in image.info:
            of = "" if subject == "the image" else f" of {subject}"
            notes.append(f"dropped the alpha channel{of} ({image.mode} image read as {mode})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Palette images with Transparency ...": the note above says it
            image = image.convert(mode)
    return image, notes


def read_image(path: str | Path, what: str = "image", *, mode: str = "RGB") -> tuple[Any, list[str]]:
    """An input image file as a pipeline takes it: fully read (open_image's checks, a pixel limit), upright as
    its EXIF orientation asks, in `mode` ("RGB"; "L" for masks, white = repaint), 16-bit scaled to 8-bit. Notes,
    one line each, say what was changed or dropped (orientation, alpha, frames after the first)."""
    image, p, frames = _open(path, what)
    notes = [f"used the first of {frames} frames of {what} {p}"] if frames > 1 else []
    image, more = conform_image(image, mode, subject=f"{what} {p}")
    return image, notes + more
