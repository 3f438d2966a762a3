"""Input images read one way for every job input (init image, mask, edit images): upright as EXIF asks, 16-bit
scaled not clipped, what was dropped said in a note, too large a file refused in one line; input paths recorded
absolute with a hash, so --from works from any folder and tells a missing or changed input."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import qimg
from qimg.errors import InputError


def halves(width: int = 64, height: int = 32) -> Image.Image:
    """Left half red, right half blue: turned 90 degrees clockwise, red is on top."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2] = (255, 0, 0)
    a[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(a)


def sideways(path: Path) -> Path:
    """A phone photo stored sideways: Orientation = 6, viewers turn it 90 degrees clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    kwargs = {"quality": 95} if path.suffix == ".jpg" else {}
    halves().save(path, exif=exif.tobytes(), **kwargs)
    return path


def assert_upright(image: Image.Image) -> None:
    assert image.size == (32, 64) and image.mode == "RGB"
    top, bottom = np.asarray(image)[8, 16].astype(int), np.asarray(image)[56, 16].astype(int)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top, blue below


def sixteen_bit(path: Path) -> Path:
    """A 16-bit grayscale PNG (PIL reads it as mode I;16): values 0..65535 that convert("RGB") clips to 255."""
    a = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    return path


def claims_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height: PIL checks the size at open, before any pixel is decoded."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_init_image_and_edit_images_are_turned_upright(
    tiny_qwen: Path, tiny_qwen_edit_pipe_and_dir, tmp_path: Path, suffix: str
) -> None:
    photo = sideways(tmp_path / f"side{suffix}")
    job = qimg.prepare_generate(tiny_qwen, "a fox", init_image=photo, steps=1)
    assert_upright(job.inputs["init_image"])
    assert f"turned init image {photo} upright as its EXIF orientation asks" in job.notes
    edit = qimg.prepare_edit(tiny_qwen_edit_pipe_and_dir[1], "a hat", [photo], steps=1)
    assert_upright(edit.inputs["images"][0])
    assert any("turned input image" in n for n in edit.notes)


def test_read_image_turns_upright(tmp_path: Path) -> None:
    from qimg.png import read_image

    image, notes = read_image(sideways(tmp_path / "side.jpg"), "init image")
    assert_upright(image)
    assert notes == [f"turned init image {tmp_path / 'side.jpg'} upright as its EXIF orientation asks"]
    assert read_image(sideways(tmp_path / "side.png"))[0].size == (32, 64)
    halves().save(tmp_path / "plain.png")
    assert read_image(tmp_path / "plain.png") == (read_image(tmp_path / "plain.png")[0], [])


def test_sixteen_bit_images_are_scaled_not_clipped(tiny_qwen: Path, tmp_path: Path) -> None:
    path = sixteen_bit(tmp_path / "deep.png")
    expected = (np.arange(64 * 32).reshape(32, 64) * 32 >> 8).astype(np.uint8)
    job = qimg.prepare_generate(tiny_qwen, "a fox", init_image=path, mask=path, steps=1)
    init, mask = job.inputs["init_image"], job.inputs["mask"]
    assert init.mode == "RGB" and np.array_equal(np.asarray(init)[..., 1], expected)
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), expected)  # masks are read as L, white = repaint


def test_dropped_alpha_and_frames_are_said(tiny_qwen: Path, tmp_path: Path) -> None:
    Image.new("RGBA", (48, 32), (10, 200, 30, 128)).save(tmp_path / "x.png")
    frames = [Image.new("RGB", (40, 32), (80 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "x.gif", save_all=True, append_images=frames[1:], duration=100)
    job = qimg.prepare_generate(tiny_qwen, "a fox", init_image=tmp_path / "x.png", mask=tmp_path / "x.gif", steps=1)
    assert job.notes[:2] == [
        f"dropped the alpha channel of init image {tmp_path / 'x.png'} (RGBA image read as RGB)",
        f"used the first of 3 frames of mask {tmp_path / 'x.gif'}",
    ]
    assert job.inputs["init_image"].mode == "RGB" and job.inputs["mask"].mode == "L"
    assert np.asarray(job.inputs["init_image"])[0, 0].tolist() == [10, 200, 30]
    assert np.asarray(job.inputs["mask"]).max() == 0  # the first frame (black), not a later one


def test_too_large_images_are_one_line_and_warn_nothing(
    tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = claims_size(tmp_path / "bomb.png", 20000, 20000)  # 400 MP in a 70-byte file
    with pytest.raises(InputError, match=r"init image .*bomb\.png is 400\.0 MP, over qimg's limit") as info:
        qimg.prepare_generate(tiny_qwen, "a fox", init_image=bomb, steps=1)
    assert "resize it first" in (info.value.hint or "")
    # The same at a small scale (PIL's limit lowered): over twice the limit is refused, between the two is read
    # without PIL's raw DecompressionBombWarning.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1600 px: over 1000, under 2000
    Image.new("RGB", (50, 50)).save(tmp_path / "huge.png")  # 2500 px
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        job = qimg.prepare_generate(tiny_qwen, "a fox", init_image=tmp_path / "big.png", steps=1)
        assert job.inputs["init_image"].size == (40, 40)
        with pytest.raises(InputError, match=r"huge\.png is 2500 px, over qimg's limit of 2000 px"):
            qimg.prepare_generate(tiny_qwen, "a fox", init_image=tmp_path / "huge.png", steps=1)


def _made_here(tiny_qwen: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, **inputs: str) -> Path:
    """Prepare a job from `folder` with relative input paths and save its PNG parameters as a run would."""
    monkeypatch.chdir(folder)
    job = qimg.prepare_generate(tiny_qwen, "a fox", seed=3, steps=1, width=32, height=32, **inputs)
    params = {**job.request.as_dict(), "model": str(tiny_qwen), **job.extra}
    return qimg.save_png(Image.new("RGB", (32, 32)), folder / "made.png", params).resolve()


def test_replay_works_from_another_folder(tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    halves().save(tmp_path / "a" / "init.png")
    Image.new("L", (64, 32), 255).save(tmp_path / "a" / "mask.png")
    png = _made_here(tiny_qwen, tmp_path / "a", monkeypatch, init_image="init.png", mask="mask.png")
    params = qimg.read_params(png)
    assert params["init_image"] == str((tmp_path / "a" / "init.png").resolve())
    assert len(params["init_image_sha256"]) == 16 and len(params["mask_sha256"]) == 16
    monkeypatch.chdir(tmp_path / "b")
    args = qimg.replay(png)
    assert args["init_image"] == (tmp_path / "a" / "init.png").resolve() and "notes" not in args
    job = qimg.prepare_generate(**args)
    assert job.inputs["init_image"].size == (64, 32) and job.inputs["mask"].mode == "L"


def test_replay_names_a_missing_input(tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    halves().save(tmp_path / "init.png")
    png = _made_here(tiny_qwen, tmp_path, monkeypatch, init_image="init.png")
    (tmp_path / "init.png").unlink()
    with pytest.raises(InputError, match=r"the init image .*made\.png was made from is not at .*init\.png") as e:
        qimg.replay(png)
    assert e.value.hint == "pass --init-image to give it"
    halves().save(tmp_path / "other.png")
    assert qimg.replay(png, init_image=tmp_path / "other.png")["init_image"] == tmp_path / "other.png"


def test_replay_notes_a_changed_input(tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    halves().save(tmp_path / "init.png")
    png = _made_here(tiny_qwen, tmp_path, monkeypatch, init_image="init.png")
    Image.new("RGB", (64, 32), (1, 2, 3)).save(tmp_path / "init.png")
    args = qimg.replay(png)
    (note,) = args["notes"]
    assert note.startswith(f"init image {(tmp_path / 'init.png').resolve()} changed since {png} was made")
    job = qimg.prepare_generate(**args)
    assert note in job.notes and "notes" not in job.request.as_dict()
