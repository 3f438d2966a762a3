"""Training images: their upright size from the header alone, and their pixels as a training target (PIL and
torch, imported when called)."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from qimg.errors import InputError

if TYPE_CHECKING:
    import torch

_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_PNG_LATE_METADATA = (b"eXIf", b"iTXt", b"tEXt", b"zTXt")  # where PIL looks for EXIF or XMP orientation


class DatasetError(InputError):
    """A training dataset, or one of its files, cannot be used as given (exit 1: nothing ran)."""


def upright_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(width, height) of an image file as viewers show it (EXIF orientation applied), from its header: the
    pixels are not decoded. Unreadable, missing or too large files (qimg.png.max_pixels) are a DatasetError."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file",
                           hint="check the path (metadata paths are relative to the metadata file)")
    try:
        with warnings.catch_warnings():
            # Up to qimg's pixel limit the image is fine to read; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if im.format == "PNG" and not _png_metadata_after_pixels(path):
                    # PIL's PNG getexif decodes the whole image to look for EXIF after the pixels; there is none.
                    exif = Image.Image.getexif(im)
                else:
                    exif = im.getexif()
                orientation = exif.get(_ORIENTATION, 1)
    except Image.DecompressionBombError:
        from qimg.png import max_pixels

        limit = max_pixels() or 0
        raise DatasetError(f"{what} {path} has more pixels than qimg reads (about {int(limit**0.5)}x"
                           f"{int(limit**0.5)})", hint="resize it first; training uses about 1 MP") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{what} {path} is not an image PIL can read",
                           hint="use PNG, JPEG, WebP or BMP files") from None
    except (OSError, ValueError, SyntaxError, struct.error) as e:
        # SyntaxError: PIL's "broken PNG file" for a damaged chunk.
        raise DatasetError(f"{what} {path} is not a readable image ({e})", hint="replace or remove it") from e
    return (height, width) if orientation in _TURNED else (width, height)


def _png_metadata_after_pixels(path: Path) -> bool:
    """Whether a PNG has EXIF or text chunks after its image data, walking the chunk headers only (seeks, no
    inflating). Such files are rare, but their orientation is only known once the pixels are read."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        pixels = False
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                break
            if kind == b"IDAT":
                pixels = True
            elif pixels and kind in _PNG_LATE_METADATA:
                return True
            f.seek(length + 4, io.SEEK_CUR)  # the data and its CRC
    return False


def load_image(item_path: Path, size: tuple[int, int]) -> torch.Tensor:
    """An image file as a training target: upright (EXIF), RGB, scaled with Lanczos (sharp, no aliasing when
    shrinking) to cover size = (width, height) keeping its aspect ratio, center-cropped to exactly that size;
    float32 (3, height, width) in [-1, 1]. Alpha is dropped as qimg.png.read_image does. Deterministic."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from qimg.png import read_image

    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"a training size of {width}x{height}")
    image, _notes = read_image(item_path, "training image")
    # fit crops the covering box out of the source and resizes it in one pass (resize(box=...)): one resampling.
    image = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0).contiguous()
