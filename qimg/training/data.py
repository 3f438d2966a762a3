"""Training datasets: a folder of images with .txt captions, or a metadata .jsonl/.csv, read into TrainItems and
checked whole before anything heavy runs; aspect-ratio buckets; image tensors; seeded epoch batches; cache keys.
Pure Python; the image files themselves are read in images.py."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qimg.errors import InputError
from qimg.training.images import DatasetError, upright_size

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_PIXELS = 256 * 256  # the smallest training image (area); below it a picture holds too little to learn from
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
CONTROL_DIR = "control"
# Metadata keys and the spellings other trainers write for them (musubi JSONL, DiffSynth); numbered musubi
# columns control_path_0, control_path_1, ... are read as a list too.
KEYS: dict[str, tuple[str, ...]] = {
    "image": ("image", "image_path"),
    "prompt": ("prompt", "caption"),
    "control": ("control", "control_path", "edit_image"),
}
_NUMBERED_CONTROL = re.compile(r"control_path_(\d+)")


@dataclass(frozen=True)
class TrainItem:
    """One training example: the target image, its caption, its control images (edit models), its upright size."""

    image: Path
    caption: str
    controls: tuple[Path, ...]
    width: int
    height: int


@dataclass(frozen=True)
class _Entry:
    """A dataset row before its files are opened; `where` prefixes messages ("meta.csv:3: ", or empty)."""

    image: Path
    caption: str
    controls: tuple[Path, ...]
    where: str = ""


# --- finding items -------------------------------------------------------------------------------------------


def find_items(data: str | Path, *, edit: bool = False, max_pixels: int = 1024 * 1024,
               step: int = 16) -> list[TrainItem]:
    """Every training example of a dataset: a folder of images with same-name .txt captions (and, for edit models,
    control/NAME.png or control/NAME_0.png, NAME_1.png, ...), or a metadata.jsonl/.csv (in the folder or given
    directly; keys image, prompt, control; paths relative to the metadata file). Every file is opened (headers
    only) and every problem found before this returns; the first is raised as one DatasetError line, with a count
    of the others. Give the `max_pixels` and `step` that bucket_for will get: an image is refused here exactly when
    it is under the minimum area (MIN_PIXELS, or max_pixels if smaller) or bucket_for could not size it."""
    _check_resolution(max_pixels, step)
    source = Path(data).expanduser()
    if source.is_dir():
        found = [source / name for name in METADATA_NAMES if (source / name).is_file()]
        if len(found) > 1:
            raise DatasetError(f"{source} holds both {METADATA_NAMES[0]} and {METADATA_NAMES[1]}",
                               hint="keep one of them, or give the one to use as the dataset path")
        problems: list[DatasetError] = []
        entries = _metadata_entries(found[0], edit, problems) if found else _folder_entries(source, edit, problems)
    elif source.is_file() and source.suffix.lower() in (".jsonl", ".csv"):
        problems = []
        entries = _metadata_entries(source, edit, problems)
    else:
        what = "does not exist" if not source.exists() else "is not a dataset"
        raise DatasetError(f"dataset {source} {what}",
                           hint="give a folder of images with same-name .txt captions, or a metadata .jsonl or .csv")
    items = []
    for entry in entries:
        item = _check_entry(entry, edit, max_pixels, step, problems)
        if item is not None:
            items.append(item)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' * (len(problems) > 2)})" if len(problems) > 1 else ""
        raise DatasetError(problems[0].message + more, hint=problems[0].hint)
    return items


def _check_resolution(max_pixels: int, step: int) -> None:
    if step < 1 or max_pixels < step * step:
        raise InputError(f"a training resolution of {max_pixels} pixels in steps of {step} holds no image",
                         hint="use at least 256x256 pixels, e.g. the default 1024x1024")


def _files(folder: Path) -> list[Path]:
    """The images of a folder, sorted by name. Dot files are skipped: macOS writes ._NAME.png beside every
    picture on exFAT and network drives, and those are not images."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith(".") and p.is_file()), key=lambda p: p.name)


def _folder_entries(folder: Path, edit: bool, problems: list[DatasetError]) -> list[_Entry]:
    images = _files(folder)
    if not images:
        raise DatasetError(f"no images in {folder}",
                           hint=f"put {', '.join(IMAGE_EXTENSIONS)} files there, each with a same-name .txt caption, "
                                "or a metadata.jsonl/.csv (subfolders are not searched)")
    by_stem: dict[str, list[Path]] = {}
    for image in images:
        by_stem.setdefault(image.stem, []).append(image)
    for stem, same in by_stem.items():
        if len(same) > 1:
            problems.append(DatasetError(f"{same[0]} and {same[1].name} would share the caption {stem}.txt",
                                         hint="rename one of them (and give it its own caption)"))
    controls = _control_files(folder, list(by_stem), problems) if edit else {}
    if not edit:
        _refuse_control_folder(folder)
    entries = []
    for image in images:
        caption = _read_caption(image, problems)
        if caption is not None:
            entries.append(_Entry(image, caption, controls.get(image.stem, ())))
    return entries


def _read_caption(image: Path, problems: list[DatasetError]) -> str | None:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        problems.append(DatasetError(f"{image} has no caption: {txt.name} is missing",
                                     hint="write one caption per image in a .txt file of the same name "
                                          "(an empty file trains it without a caption)"))
        return None
    try:
        return txt.read_bytes().decode("utf-8-sig").strip()  # -sig: Windows editors start the file with a BOM
    except UnicodeDecodeError as e:
        problems.append(DatasetError(f"caption {txt} is not UTF-8 text (byte {e.start})", hint="save it as UTF-8"))
    except OSError as e:
        problems.append(DatasetError(f"caption {txt} cannot be read ({e.strerror})"))
    return None


def _refuse_control_folder(folder: Path) -> None:
    """A control/ folder beside a text-to-image dataset means the wrong model was chosen more often than not;
    training without the controls, and saying nothing, would waste the run."""
    control = folder / CONTROL_DIR
    if control.is_dir() and _files(control):
        raise DatasetError(f"{control} holds control images, which a text-to-image model does not use",
                           hint="train an edit model, or move the control folder out of the dataset")


def _control_files(folder: Path, stems: list[str], problems: list[DatasetError]) -> dict[str, tuple[Path, ...]]:
    """Each image's controls from control/: NAME.ext for one, NAME_0.ext, NAME_1.ext, ... for several (numbered
    from 0 without gaps). A file two images could claim, or that no image claims, is a problem: both mean the
    names do not say which pairs belong together."""
    control = folder / CONTROL_DIR
    if not control.is_dir():
        raise DatasetError(f"{folder} has no {CONTROL_DIR}/ folder: an edit model trains on (control, target) pairs",
                           hint=f"put each image's control in {control}/ under the same name (NAME_0, NAME_1, ... "
                                "for several), or give a metadata.jsonl with a control key")
    exact: dict[str, list[Path]] = {}
    numbered: dict[str, list[tuple[int, Path]]] = {}
    for f in _files(control):
        exact.setdefault(f.stem, []).append(f)
        if m := re.fullmatch(r"(.+)_(\d+)", f.stem):
            numbered.setdefault(m[1], []).append((int(m[2]), f))
    claimed: dict[Path, str] = {}
    found: dict[str, tuple[Path, ...]] = {}
    for stem in stems:
        single, several = exact.get(stem, []), sorted(numbered.get(stem, []))
        mine = single + [f for _, f in several]
        for f in mine:
            if f in claimed:
                problems.append(DatasetError(f"control {f} could belong to {claimed[f]} or to {stem}",
                                             hint="rename the images or the controls so each name fits one image"))
            claimed.setdefault(f, stem)
        if len(single) > 1 or (single and several):
            problems.append(DatasetError(f"{control} holds several controls for {stem}: "
                                         f"{', '.join(f.name for f in mine)}",
                                         hint=f"name one control {stem}.png, or several {stem}_0, {stem}_1, ..."))
        elif several and [i for i, _ in several] != list(range(len(several))):
            problems.append(DatasetError(f"the controls of {stem} in {control} are numbered "
                                         f"{', '.join(str(i) for i, _ in several)}, not 0, 1, ...",
                                         hint=f"number them {stem}_0, {stem}_1, ... without gaps"))
        found[stem] = tuple(mine)  # also after a problem: "has no control image" would only repeat it
    for f in sorted({f for files in exact.values() for f in files} - set(claimed)):
        problems.append(DatasetError(f"control {f} matches no image in {folder}",
                                     hint="remove it, or add the image it belongs to with its caption"))
    return found


def _metadata_entries(meta: Path, edit: bool, problems: list[DatasetError]) -> list[_Entry]:
    try:
        text = meta.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{meta} is not UTF-8 text (byte {e.start})", hint="save it as UTF-8") from e
    except OSError as e:
        raise DatasetError(f"{meta} cannot be read ({e.strerror})") from e
    rows = _csv_rows(meta, text) if meta.suffix.lower() == ".csv" else _jsonl_rows(meta, text, problems)
    entries = []
    for line, row in rows:
        try:
            entries.append(_row_entry(row, meta.parent, edit, f"{meta}:{line}: "))
        except DatasetError as e:
            problems.append(e)
    if not entries and not problems:
        raise DatasetError(f"{meta} lists no images", hint="one row per image, with image and prompt")
    return entries


def _jsonl_rows(meta: Path, text: str, problems: list[DatasetError]) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in enumerate(io.StringIO(text), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (ValueError, RecursionError) as e:
            problems.append(DatasetError(f"{meta}:{line}: not a JSON object ({getattr(e, 'msg', e)})",
                                         hint='one object a line, e.g. {"image": "a.png", "prompt": "a cat"}'))
            continue
        if not isinstance(row, dict):
            problems.append(DatasetError(f"{meta}:{line}: not a JSON object",
                                         hint='one object a line, e.g. {"image": "a.png", "prompt": "a cat"}'))
            continue
        yield line, row


def _csv_rows(meta: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """CSV rows as dicts; a `control` cell holds one path, several separated by ;, or a JSON list."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [name.strip() for name in reader.fieldnames or []]
    for key in ("image", "prompt"):
        if not set(header) & set(KEYS[key]):
            raise DatasetError(f"{meta} has no {key} column (its header is {','.join(header) or 'empty'})",
                               hint="the first line names the columns: image,prompt (and control for edit models)")
    reader.fieldnames = header
    for row in reader:
        cells = {k: v for k, v in row.items() if k is not None and v is not None}
        for key in [k for k in cells if k in KEYS["control"] or _NUMBERED_CONTROL.fullmatch(k)]:
            cell = cells[key].strip()
            if cell.startswith("["):
                try:
                    cells[key] = json.loads(cell)
                except ValueError:
                    pass  # left as text: _row_entry names the file it does not find
                else:
                    continue
            cells[key] = [part.strip() for part in cell.split(";") if part.strip()]
        yield reader.line_num, cells


def _pick(row: dict[str, Any], key: str, where: str) -> Any:
    given = [name for name in KEYS[key] if name in row]
    if len(given) > 1:
        raise DatasetError(f"{where}gives both {given[0]} and {given[1]}", hint="keep one of them")
    return row[given[0]] if given else None


def _row_entry(row: dict[str, Any], base: Path, edit: bool, where: str) -> _Entry:
    image, prompt = _pick(row, "image", where), _pick(row, "prompt", where)
    if not isinstance(image, str) or not image.strip():
        raise DatasetError(f"{where}no image path" if image in (None, "") else f"{where}image is not a path",
                           hint='give each row an image, e.g. {"image": "a.png", "prompt": "a cat"}')
    if prompt is None:
        raise DatasetError(f"{where}no prompt for {image}", hint='give each row a prompt ("" trains without one)')
    if not isinstance(prompt, str):
        raise DatasetError(f"{where}the prompt of {image} is not text", hint="write it in quotes")
    controls = _row_controls(row, where)
    if controls and not edit:
        raise DatasetError(f"{where}{image} has a control image, which a text-to-image model does not use",
                           hint="train an edit model, or drop the control column")
    return _Entry(_resolve(base, image), prompt.strip(), tuple(_resolve(base, c) for c in controls), where)


def _row_controls(row: dict[str, Any], where: str) -> list[str]:
    value = _pick(row, "control", where)
    numbered = sorted((int(m[1]), k) for k in row if (m := _NUMBERED_CONTROL.fullmatch(k)))
    if numbered:
        if value is not None:
            raise DatasetError(f"{where}gives both control and {numbered[0][1]}", hint="keep one of them")
        value = [path for _, k in numbered for path in (row[k] if isinstance(row[k], list) else [row[k]]) if path]
    if value is None or value == "":
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
        raise DatasetError(f"{where}control is not a path or a list of paths",
                           hint='e.g. "control": "c.png" or "control": ["c0.png", "c1.png"]')
    return [p.strip() for p in paths]


def _resolve(base: Path, path: str) -> Path:
    p = Path(path.strip()).expanduser()
    return p if p.is_absolute() else base / p


def _check_entry(entry: _Entry, edit: bool, max_pixels: int, step: int,
                 problems: list[DatasetError]) -> TrainItem | None:
    """The entry as a TrainItem, or None after adding what is wrong with it to `problems`."""
    try:
        width, height = upright_size(entry.image, f"{entry.where}image")
        if edit and not entry.controls:
            raise DatasetError(f"{entry.where}{entry.image} has no control image",
                               hint=f"an edit model trains on (control, target) pairs: put its control in "
                                    f"{CONTROL_DIR}/ under the same name, or give it one in a metadata control column")
        for control in entry.controls:
            upright_size(control, f"{entry.where}control")
        _check_size(entry, width, height, max_pixels, step)
    except DatasetError as e:
        problems.append(e)
        return None
    return TrainItem(entry.image, entry.caption, entry.controls, width, height)


def _check_size(entry: _Entry, width: int, height: int, max_pixels: int, step: int) -> None:
    # A resolution under MIN_PIXELS (a smoke test at 64x64) lowers the floor with it: every image is scaled to
    # that size anyway, so nothing is lost by a picture that only just reaches it.
    least = min(MIN_PIXELS, max_pixels)
    if width * height < least:
        side = int(least**0.5)
        raise DatasetError(f"{entry.where}{entry.image} is {width}x{height}, under the {side}x{side} training minimum",
                           hint="use a larger picture (qimg never upscales: a blurry target teaches blur) "
                                "or remove it")
    bucket = _scaled(width, height, max_pixels, step)
    if min(bucket) < step:
        raise DatasetError(f"{entry.where}{entry.image} is {width}x{height}: too narrow for a training size in steps "
                           f"of {step} (it would be {bucket[0]}x{bucket[1]})", hint="crop it, or remove it")


# --- buckets -------------------------------------------------------------------------------------------------


def bucket_for(width: int, height: int, *, max_pixels: int = 1024 * 1024, step: int = 16) -> tuple[int, int]:
    """The training size (width, height) of a width x height image: the same aspect ratio, scaled down so that
    it holds at most max_pixels, each side floored to a multiple of `step` (the center crop of load_image takes
    the rest). Never scaled up: an upscaled picture is blurry, and the LoRA would learn to paint blur; a small
    image trains at its own size instead. A side under `step` is an InputError."""
    _check_resolution(max_pixels, step)
    if width < 1 or height < 1:
        raise ValueError(f"an image of {width}x{height} pixels")
    w, h = _scaled(width, height, max_pixels, step)
    if min(w, h) < step:
        raise InputError(f"a {width}x{height} image is too narrow for a training size in steps of {step}",
                         hint="crop it, or remove it")
    return w, h


def _scaled(width: int, height: int, max_pixels: int, step: int) -> tuple[int, int]:
    if width * height > max_pixels:
        # The scale s = sqrt(max_pixels / (width * height)) in integers: width * s = sqrt(width * max_pixels /
        # height), and floor(sqrt(x)) == isqrt(floor(x)). Floats would give 1023.9999 for 1328 * (1024 / 1328) and
        # a bucket of 1008 where 1024 was meant.
        width, height = math.isqrt(width * max_pixels // height), math.isqrt(height * max_pixels // width)
    return width // step * step, height // step * step


# --- batches -------------------------------------------------------------------------------------------------


def epoch_batches(items: Sequence[TrainItem], sizes: Sequence[tuple[int, int]], *, batch_size: int, seed: int,
                  epoch: int, groups: Sequence[Any] | None = None) -> list[list[int]]:
    """The batches of one epoch as lists of item indices: items grouped by training size (and number of controls,
    so a batch stacks), each group shuffled and cut into batches of at most batch_size, then the batches
    shuffled. groups: one more key per item that a batch must share (hashable, and sortable against the others,
    e.g. the token grids of an edit item's controls); None groups by size and control count alone. A pure
    function of its arguments, so resume can recompute an epoch and skip to a batch."""
    if len(items) != len(sizes):
        raise ValueError(f"{len(items)} items but {len(sizes)} sizes")
    if groups is not None and len(groups) != len(items):
        raise ValueError(f"{len(items)} items but {len(groups)} group keys")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}")
    # A generator of its own (never the global one, which a resumed run would find elsewhere), seeded by a string:
    # Python hashes str seeds with SHA-512, the same on every machine and unaffected by PYTHONHASHSEED.
    rng = random.Random(f"{seed}:{epoch}")
    members_of: dict[tuple[Any, ...], list[int]] = {}
    for i, (item, (w, h)) in enumerate(zip(items, sizes, strict=True)):
        # Without extra keys the key is exactly the old (w, h, n): the same sort, so the same batches as before.
        key = (w, h, len(item.controls)) if groups is None else (w, h, len(item.controls), groups[i])
        members_of.setdefault(key, []).append(i)
    batches: list[list[int]] = []
    for key in sorted(members_of):
        members = _shuffled(members_of[key], rng)
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    return _shuffled(batches, rng)


def _shuffled(values: list[Any], rng: random.Random) -> list[Any]:
    """Fisher-Yates on rng.random(), the one part of `random` Python promises to keep the same across versions
    (Random.shuffle may change), so a checkpoint resumes on another Python into the same batch order."""
    out = list(values)
    for i in range(len(out) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        out[i], out[j] = out[j], out[i]
    return out


# --- cache keys ----------------------------------------------------------------------------------------------


def cache_key(item: TrainItem, size: tuple[int, int], model: str) -> str:
    """The name of an item's cached latents and embeddings: a hash of what they are computed from (the image
    and control bytes, the caption, the training size, the model fingerprint), never of paths or file times,
    so a moved dataset keeps its cache and an edited file misses it. 32 hex digits (128 bits)."""
    payload = {
        "v": 1,  # the layout of this payload; bump it to retire every old cache entry
        "image": _file_sha256(item.image),
        "caption": item.caption,
        "size": [int(size[0]), int(size[1])],
        "controls": [_file_sha256(c) for c in item.controls],
        "model": model,
    }
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise DatasetError(f"training file {path} cannot be read ({e.strerror})",
                           hint="check that the dataset has not moved since the run started") from e
    return digest.hexdigest()
