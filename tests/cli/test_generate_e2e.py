"""qimg generate on a real tiny model (the session fixture `tiny_qwen` from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app


def test_generate_tiny_model(tiny_qwen: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.png"
    argv = [
        "generate", "a red fox in snow", "-o", str(out), "--model", str(tiny_qwen),
        "--steps", "2", "--width", "64", "--height", "48", "--seed", "3", "--device", "cpu", "--overwrite",
    ]  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(app, argv, prog_name="qimg")
    assert first.exit_code == 0, first.output
    assert "seed: 3" in first.stderr.splitlines()
    with Image.open(out) as im:
        assert im.size == (64, 48)  # (width, height)
        pixels = im.convert("RGB").tobytes()
    params = qimg.read_params(out)
    assert (params["seed"], params["steps"], params["prompt"]) == (3, 2, "a red fox in snow")
    assert (params["width"], params["height"]) == (64, 48)

    second = runner.invoke(app, argv, prog_name="qimg")
    assert second.exit_code == 0, second.output
    with Image.open(out) as im:
        assert im.convert("RGB").tobytes() == pixels  # same seed, same image
