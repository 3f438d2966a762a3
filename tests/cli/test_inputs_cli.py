"""qimg generate reads --init-image as every input is read: a sideways phone photo reaches the pipeline upright,
and what was changed is said on stderr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app


def test_init_image_reaches_the_pipeline_upright(
    runner: CliRunner, fake_model: Path, out_dir: Path, tmp_path: Path, fake_load: list
) -> None:
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = (255, 0, 0)  # left half red: turned 90 degrees clockwise, red is on top
    a[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: viewers turn it 90 degrees clockwise
    photo = tmp_path / "rotated.jpg"
    Image.fromarray(a).save(photo, exif=exif.tobytes(), quality=95)

    out = out_dir / "a.png"
    argv = ["generate", "a red fox", "-o", str(out), "--model", str(fake_model), "--init-image", str(photo),
            "--width", "32", "--height", "64"]
    result = runner.invoke(app, argv, prog_name="qimg")
    assert result.exit_code == 0, result.output
    (pipe,) = fake_load
    init = pipe.inputs["init_image"]
    assert init.size == (32, 64) and init.mode == "RGB"
    top, bottom = np.asarray(init)[8, 16].astype(int), np.asarray(init)[56, 16].astype(int)
    assert top[0] > 200 and bottom[2] > 200
    assert f"warning: turned init image {photo} upright as its EXIF orientation asks" in result.stderr
    params = qimg.read_params(out)
    assert params["init_image"] == str(photo.resolve()) and len(params["init_image_sha256"]) == 16
