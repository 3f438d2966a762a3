"""The training dataset layer: folders with .txt captions, metadata.jsonl/.csv, edit controls, every bad-data case
as one line naming the file, buckets, image tensors (EXIF upright), seeded epoch batches, cache keys."""

from __future__ import annotations

import json
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qimg.errors import InputError
from qimg.training.data import (
    MIN_PIXELS,
    DatasetError,
    TrainItem,
    bucket_for,
    cache_key,
    epoch_batches,
    find_items,
)
from qimg.training.images import load_image

SIZE = (320, 256)  # small, yet above MIN_PIXELS (256x256)


def img(path: Path, size: tuple[int, int] = SIZE, color: tuple[int, int, int] = (200, 30, 30), **save: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **save)
    return path


def pair(folder: Path, name: str, caption: str = "a red square", size: tuple[int, int] = SIZE) -> Path:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    return img(folder / name, size)


def refused(data: Path, **kwargs: object) -> str:
    """The one-line message find_items raises for a bad dataset (a DatasetError, so an InputError: exit 1)."""
    with pytest.raises(DatasetError) as info:
        find_items(data, **kwargs)
    assert isinstance(info.value, InputError) and info.value.exit_code == 1
    message = str(info.value)
    assert "\n" not in message and info.value.hint and "\n" not in info.value.hint
    return message


# --- folders and metadata ------------------------------------------------------------------------------------


def test_folder_of_images_with_captions(tmp_path):
    pair(tmp_path, "b.JPG", "  second \n")
    pair(tmp_path, "a.png", "first")
    img(tmp_path / "c.webp", (256, 300))
    (tmp_path / "c.txt").write_bytes(b"")  # an empty caption is allowed
    (tmp_path / "notes.md").write_text("not part of the dataset")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not an image
    img(tmp_path / "sub" / "d.png")  # not recursive
    items = find_items(tmp_path)
    assert [(i.image.name, i.caption, i.width, i.height) for i in items] == [
        ("a.png", "first", 320, 256), ("b.JPG", "second", 320, 256), ("c.webp", "", 256, 300)]
    assert all(i.controls == () for i in items)
    with pytest.raises(AttributeError):
        items[0].caption = "frozen"


def test_metadata_jsonl_in_the_folder_or_given_directly(tmp_path):
    img(tmp_path / "pics" / "one.png")
    img(tmp_path / "two.jpg")
    rows = [{"image": "pics/one.png", "prompt": " a cat "}, {"image_path": "two.jpg", "caption": "a dog", "extra": 1}]
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    for data in (tmp_path, meta, str(meta)):
        items = find_items(data)
        assert [(i.image, i.caption) for i in items] == [(tmp_path / "pics" / "one.png", "a cat"),
                                                          (tmp_path / "two.jpg", "a dog")]


def test_metadata_csv_relative_to_its_folder(tmp_path):
    img(tmp_path / "data" / "x.png")
    img(tmp_path / "data" / "y.png", (256, 400))
    meta = tmp_path / "data" / "list.csv"
    meta.write_text('\ufeffimage,prompt\nx.png,"a red, square thing"\ny.png,\n', encoding="utf-8")
    items = find_items(meta)
    assert [(i.image.name, i.caption, i.height) for i in items] == [("x.png", "a red, square thing", 256),
                                                                     ("y.png", "", 400)]


def test_edit_folder_with_single_and_numbered_controls(tmp_path):
    pair(tmp_path, "a.png")
    pair(tmp_path, "b.png")
    img(tmp_path / "control" / "a.jpg")
    for n in (2, 0, 1):  # written out of order: the number decides
        img(tmp_path / "control" / f"b_{n}.png")
    items = find_items(tmp_path, edit=True)
    assert [i.controls for i in items] == [
        (tmp_path / "control" / "a.jpg",), tuple(tmp_path / "control" / f"b_{n}.png" for n in range(3))]


def test_edit_metadata_controls_as_path_list_and_semicolons(tmp_path):
    for name in ("t1.png", "t2.png", "c1.png", "c2.png", "c3.png"):
        img(tmp_path / name)
    rows = [{"image": "t1.png", "prompt": "p1", "control": "c1.png"},
            {"image": "t2.png", "prompt": "p2", "control": ["c2.png", "c3.png"]}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    expect = [(tmp_path / "c1.png",), (tmp_path / "c2.png", tmp_path / "c3.png")]
    assert [i.controls for i in find_items(tmp_path, edit=True)] == expect
    csv_file = tmp_path / "edit.csv"
    csv_file.write_text("image,prompt,control\nt1.png,p1,c1.png\nt2.png,p2, c2.png ; c3.png\n", encoding="utf-8")
    assert [i.controls for i in find_items(csv_file, edit=True)] == expect
    csv_file.write_text('image,prompt,control\nt1.png,p1,c1.png\nt2.png,p2,"[""c2.png"", ""c3.png""]"\n')
    assert [i.controls for i in find_items(csv_file, edit=True)] == expect  # a JSON list in a cell too
    musubi = tmp_path / "musubi.jsonl"  # musubi-tuner's spelling: image_path, caption, control_path_0, _1
    musubi.write_text(json.dumps({"image_path": "t2.png", "caption": "p2", "control_path_1": "c3.png",
                                  "control_path_0": "c2.png"}), encoding="utf-8")
    assert [i.controls for i in find_items(musubi, edit=True)] == expect[1:]


# --- bad data: one line naming the file ----------------------------------------------------------------------


def _folder(tmp_path: Path, *names: str) -> Path:
    for name in names:
        pair(tmp_path, name)
    return tmp_path


BAD_FOLDERS = {
    # case: (setup, find_items keywords, what the message names)
    "no images": (lambda d: (d / "readme.txt").write_text("x"), {}, "no images in {d}"),
    "not an image": (lambda d: (_folder(d, "a.png"), (d / "b.png").write_bytes(b"not a png"),
                                (d / "b.txt").write_text("b")), {}, "b.png is not an image"),
    "missing caption": (lambda d: (_folder(d, "a.png"), img(d / "b.png")), {}, "b.png has no caption: b.txt"),
    "two missing captions": (lambda d: (img(d / "a.png"), img(d / "b.png")), {}, "a.png has no caption: a.txt "
                             "is missing (and 1 more problem)"),
    "not UTF-8": (lambda d: (_folder(d, "a.png"), (d / "a.txt").write_bytes(b"caf\xe9")), {}, "a.txt is not UTF-8"),
    "two images, one caption": (lambda d: (_folder(d, "a.png"), img(d / "a.jpg")), {}, "share the caption a.txt"),
    "too small": (lambda d: pair(d, "s.png", size=(200, 200)), {}, "s.png is 200x200, under the 256x256"),
    "too narrow": (lambda d: pair(d, "n.png", size=(8200, 8)), {}, "n.png is 8200x8: too narrow"),
    "edit without control folder": (lambda d: _folder(d, "a.png"), {"edit": True}, "has no control/ folder"),
    "edit, missing control": (lambda d: (_folder(d, "a.png", "b.png"), img(d / "control" / "a.png")),
                              {"edit": True}, "b.png has no control image"),
    "edit, two kinds of control": (lambda d: (_folder(d, "a.png"), img(d / "control" / "a.png"),
                                              img(d / "control" / "a_0.png")), {"edit": True},
                                   "several controls for a: a.png, a_0.png"),
    "edit, numbering gap": (lambda d: (_folder(d, "a.png"), img(d / "control" / "a_0.png"),
                                       img(d / "control" / "a_2.png")), {"edit": True}, "numbered 0, 2"),
    "edit, orphan control": (lambda d: (_folder(d, "a.png"), img(d / "control" / "a.png"),
                                        img(d / "control" / "z.png")), {"edit": True}, "z.png matches no image"),
    "edit, control claimed twice": (lambda d: (_folder(d, "a.png", "a_0.png"), img(d / "control" / "a_0.png")),
                                    {"edit": True}, "a_0.png could belong to a or to a_0"),
    "edit, unreadable control": (lambda d: (_folder(d, "a.png"), (d / "control").mkdir(),
                                            (d / "control" / "a.png").write_bytes(b"")), {"edit": True},
                                 "control/a.png is not an image"),
    "text-to-image with control folder": (lambda d: (_folder(d, "a.png"), img(d / "control" / "a.png")), {},
                                          "control holds control images, which a text-to-image model"),
    "both metadata files": (lambda d: ((d / "metadata.jsonl").write_text("{}"), (d / "metadata.csv").write_text("")),
                            {}, "holds both metadata.jsonl and metadata.csv"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_is_one_line_naming_the_file(tmp_path, case):
    setup, kwargs, expected = BAD_FOLDERS[case]
    setup(tmp_path)
    message = refused(tmp_path, **kwargs)
    assert expected.format(d=tmp_path) in message
    assert "more problem" not in message or case == "two missing captions"  # one mistake is reported once


BAD_METADATA = {
    # case: (file name, content, find_items keywords, what the message names)
    "bad JSON": ("m.jsonl", '{"image": "a.png", "prompt": "p"}\n{"image": \n', {}, "m.jsonl:2: not a JSON object"),
    "not an object": ("m.jsonl", '["a.png", "p"]\n', {}, "m.jsonl:1: not a JSON object"),
    "no prompt": ("m.jsonl", '{"image": "a.png"}\n', {}, "m.jsonl:1: no prompt for a.png"),
    "prompt not text": ("m.jsonl", '{"image": "a.png", "prompt": 3}\n', {}, "m.jsonl:1: the prompt of a.png"),
    "no image key": ("m.jsonl", '{"prompt": "p"}\n', {}, "m.jsonl:1: no image path"),
    "both spellings": ("m.jsonl", '{"image": "a.png", "image_path": "a.png", "prompt": "p"}\n', {},
                       "m.jsonl:1: gives both image and image_path"),
    "missing image": ("m.jsonl", '{"image": "gone.png", "prompt": "p"}\n', {}, "m.jsonl:1: image "),
    "empty": ("m.jsonl", "\n\n", {}, "m.jsonl lists no images"),
    "control for text-to-image": ("m.jsonl", '{"image": "a.png", "prompt": "p", "control": "a.png"}\n', {},
                                  "m.jsonl:1: a.png has a control image, which a text-to-image model"),
    "edit row without control": ("m.jsonl", '{"image": "a.png", "prompt": "p"}\n', {"edit": True},
                                 "m.jsonl:1: " + "{d}/a.png has no control image"),
    "control not a path": ("m.jsonl", '{"image": "a.png", "prompt": "p", "control": [1]}\n', {"edit": True},
                           "m.jsonl:1: control is not a path"),
    "missing control": ("m.jsonl", '{"image": "a.png", "prompt": "p", "control": ["nope.png"]}\n', {"edit": True},
                        "m.jsonl:1: control {d}/nope.png does not exist"),
    "csv without prompt column": ("m.csv", "image,text\na.png,p\n", {}, "m.csv has no prompt column"),
    "csv missing image": ("m.csv", "image,prompt\na.png,p\ngone.png,q\n", {}, "m.csv:3: image {d}/gone.png does not"),
    "csv not UTF-8": ("m.csv", b"image,prompt\na.png,caf\xe9\n", {}, "m.csv is not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_bad_metadata_is_one_line_naming_the_file_and_line(tmp_path, case):
    name, content, kwargs, expected = BAD_METADATA[case]
    img(tmp_path / "a.png")
    meta = tmp_path / name
    meta.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = refused(meta, **kwargs)
    assert str(meta) in message and expected.format(d=tmp_path) in message


def test_bad_dataset_paths(tmp_path):
    assert "does not exist" in refused(tmp_path / "nowhere")
    (tmp_path / "data.json").write_text("[]")
    assert "data.json is not a dataset" in refused(tmp_path / "data.json")


def test_decompression_bomb_is_refused_from_the_header(tmp_path, monkeypatch):
    pair(tmp_path, "big.png", size=(600, 600))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # qimg refuses over twice PIL's limit: 200,000
    assert "big.png has more pixels than qimg reads" in refused(tmp_path)


def test_resolution_lowers_the_minimum_and_rejects_nonsense(tmp_path):
    pair(tmp_path, "small.png", size=(64, 48))
    assert "under the 256x256 training minimum" in refused(tmp_path)
    (item,) = find_items(tmp_path, max_pixels=32 * 32)  # a smoke-test resolution: the floor follows it
    assert (item.width, item.height) == (64, 48) and bucket_for(64, 48, max_pixels=32 * 32) == (32, 16)
    with pytest.raises(InputError, match="holds no image"):
        find_items(tmp_path, max_pixels=10)
    assert MIN_PIXELS == 256 * 256


# --- EXIF orientation ----------------------------------------------------------------------------------------


def halves(width: int = 320, height: int = 256) -> Image.Image:
    """Top half red, bottom half blue, as stored; turned 90 degrees clockwise (Orientation 6) red is on the right."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2] = (255, 0, 0)
    a[height // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def sideways(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6
    halves().save(path, exif=exif.tobytes(), **({"quality": 95} if path.suffix == ".jpg" else {}))
    path.with_suffix(".txt").write_text("sideways")
    return path


def exif_after_pixels(path: Path) -> None:
    """Move a PNG's eXIf chunk after its IDAT (allowed by the PNG spec; PIL only finds it when decoding)."""
    data, pos, chunks = path.read_bytes(), 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos:pos + 12 + length])
        pos += 12 + length
    kinds = [c[4:8] for c in chunks]
    exif = chunks.pop(kinds.index(b"eXIf"))
    chunks.insert(len(chunks) - 1, exif)  # just before IEND
    path.write_bytes(data[:8] + b"".join(chunks))
    assert [c[4:8] for c in chunks][-2:] == [b"eXIf", b"IEND"] and zlib.crc32(exif[4:-4]) == int.from_bytes(exif[-4:])


@pytest.mark.parametrize("name", ["photo.jpg", "early.png", "late.png"])
def test_exif_orientation_gives_the_upright_size_and_pixels(tmp_path, name):
    path = sideways(tmp_path / name)
    if name == "late.png":
        exif_after_pixels(path)
    (item,) = find_items(tmp_path)
    assert (item.width, item.height) == (256, 320)
    x = load_image(item.image, (item.width, item.height))
    assert x.shape == (3, 320, 256)
    left, right = x[:, 160, 20], x[:, 160, 236]
    assert left[2] > 0.8 and left[0] < -0.6 and right[0] > 0.8 and right[2] < -0.6  # blue left, red right


# --- buckets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "bucket"), [
    ((2048, 2048), (1024, 1024)),
    ((1328, 1328), (1024, 1024)),  # 1328 * (1024 / 1328) must not come out as 1023.999 -> 1008
    ((1024, 1024), (1024, 1024)),
    ((1664, 928), (1360, 752)),  # Qwen-Image's 16:9 size is 1.54 MP: scaled down too
    ((1000, 700), (992, 688)),  # under 1 MP: kept, floored to 16
    ((3000, 1000), (1760, 576)),
    ((1000, 3000), (576, 1760)),
    ((300, 300), (288, 288)),  # small: trained at its own size, never upscaled
    ((4032, 3024), (1168, 880)),
])
def test_bucket_for_known_sizes(size, bucket):
    assert bucket_for(*size) == bucket


def test_bucket_for_never_upscales_and_stays_under_the_area():
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(16, 6000), rng.randint(16, 6000)
        for max_pixels, step in ((1024 * 1024, 16), (512 * 512, 16), (1328 * 1328, 32)):
            if min(w, h) * min(1.0, (max_pixels / (w * h)) ** 0.5) < step + 1:
                continue  # too narrow to keep a side of `step` (refused, below)
            bw, bh = bucket_for(w, h, max_pixels=max_pixels, step=step)
            assert bw <= w and bh <= h and bw * bh <= max_pixels
            assert bw % step == 0 and bh % step == 0 and min(bw, bh) >= step
            if w * h >= 4 * max_pixels and max(w, h) <= 4 * min(w, h):  # a large picture uses nearly all the area
                assert bw * bh > 0.9 * max_pixels
    assert bucket_for(1328, 1328, max_pixels=512 * 512) == (512, 512)
    with pytest.raises(InputError, match="too narrow"):
        bucket_for(8200, 8)


# --- pixels --------------------------------------------------------------------------------------------------


def test_load_image_covers_crops_and_scales_to_minus_one_one(tmp_path):
    a = np.zeros((200, 400, 3), np.uint8)  # wide: left quarter black, the middle half gray, right quarter white
    a[:, 100:300] = 128
    a[:, 300:] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(a).save(path)
    x = load_image(path, (160, 192))  # taller than the picture's shape: the sides are cropped off
    assert x.shape == (3, 192, 160) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x, torch.full_like(x, 128 / 127.5 - 1), atol=0.02)  # only the gray middle is left
    y = load_image(path, (200, 100))  # same shape: scaled only, black and white edges exact
    assert y[:, :, 0].eq(-1).all() and y[:, :, -1].eq(1).all()
    assert torch.equal(load_image(path, (160, 192)), x)  # deterministic


# --- batches -------------------------------------------------------------------------------------------------


def _items(n: int, controls: int = 0) -> list[TrainItem]:
    return [TrainItem(Path(f"{i}.png"), "", (Path("c.png"),) * controls, 64, 64) for i in range(n)]


def test_epoch_batches_cover_each_index_once_grouped_by_size():
    items = _items(20) + _items(3, controls=1)
    sizes = [(1024, 1024)] * 9 + [(1360, 752)] * 7 + [(576, 1760)] * 4 + [(1024, 1024)] * 3
    state = random.getstate()
    batches = epoch_batches(items, sizes, batch_size=4, seed=7, epoch=0)
    assert random.getstate() == state  # the global generator is never touched
    assert sorted(i for b in batches for i in b) == list(range(23))
    for b in batches:
        assert 1 <= len(b) <= 4
        assert len({(sizes[i], len(items[i].controls)) for i in b}) == 1  # one size, one control count: it stacks
    # (1024², no control) 9 -> 4+4+1, 1360x752 7 -> 4+3, 576x1760 4 -> 4, (1024², 1 control) 3 -> 3
    assert sorted(len(b) for b in batches) == [1, 3, 3, 4, 4, 4, 4]
    assert epoch_batches(items, sizes, batch_size=4, seed=7, epoch=0) == batches
    assert epoch_batches(items, sizes, batch_size=4, seed=7, epoch=1) != batches
    assert epoch_batches(items, sizes, batch_size=4, seed=8, epoch=0) != batches


def test_epoch_batches_are_the_same_on_every_machine_and_python():
    """A resumed run recomputes its epoch: the order is pinned here (Fisher-Yates on Random.random, which
    Python keeps stable across versions; a change to this list breaks exact resume of existing runs)."""
    sizes = [(512, 512)] * 6 + [(768, 256)] * 4
    assert epoch_batches(_items(10), sizes, batch_size=2, seed=0, epoch=3) == GOLDEN


GOLDEN = [[8, 7], [2, 1], [3, 5], [6, 9], [4, 0]]


def test_epoch_batches_refuse_mismatched_arguments():
    with pytest.raises(ValueError):
        epoch_batches(_items(2), [(64, 64)], batch_size=1, seed=0, epoch=0)
    with pytest.raises(ValueError):
        epoch_batches(_items(1), [(64, 64)], batch_size=0, seed=0, epoch=0)


# --- cache keys ----------------------------------------------------------------------------------------------


MODEL = "qwen-image-edit-2511@abc"


def test_cache_key_follows_content_not_place(tmp_path):
    pair(tmp_path / "a", "t.png")
    img(tmp_path / "a" / "control" / "t_0.png", color=(1, 2, 3))
    img(tmp_path / "a" / "control" / "t_1.png", color=(4, 5, 6))
    (item,) = find_items(tmp_path / "a", edit=True)
    key = cache_key(item, (320, 256), MODEL)
    assert len(key) == 32 and int(key, 16) >= 0
    # Same bytes elsewhere, with new file times: the same key.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (moved,) = find_items(tmp_path / "b", edit=True)
    assert moved.image != item.image and cache_key(moved, (320, 256), MODEL) == key
    # Each input changes it.
    changed = {
        cache_key(TrainItem(item.image, "another caption", item.controls, 320, 256), (320, 256), MODEL),
        cache_key(item, (256, 256), MODEL),
        cache_key(item, (320, 256), "qwen-image-edit-2509@abc"),
        cache_key(TrainItem(item.image, item.caption, item.controls[::-1], 320, 256), (320, 256),
                  MODEL),
    }
    img(moved.image, color=(200, 30, 31))
    changed.add(cache_key(moved, (320, 256), MODEL))
    img(tmp_path / "a" / "control" / "t_1.png", color=(4, 5, 7))
    changed.add(cache_key(item, (320, 256), MODEL))
    assert len(changed) == 6 and key not in changed
