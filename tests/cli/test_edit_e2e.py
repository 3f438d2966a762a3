"""qimg edit and encode-prompt -i on a tiny Qwen-Image-Edit-2509 (fixtures in tests/edit/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app

pytestmark = pytest.mark.slow


def _invoke(*argv: str):
    return CliRunner().invoke(app, list(argv), prog_name="qimg")


def _picture(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


def _pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def test_edit_two_images_and_prompt_embeds(tiny_qwen_edit_2509_pipe_and_dir, tmp_path: Path) -> None:
    folder = tiny_qwen_edit_2509_pipe_and_dir[1]
    a, b = _picture(tmp_path / "a.png", (60, 40), 0), _picture(tmp_path / "b.png", (40, 40), 1)
    common = ["--model", str(folder), "--device", "cpu"]
    run = ["--steps", "2", "--seed", "4", "--width", "48", "--height", "32", *common]
    first = _invoke("edit", "put the cat on the sofa", "-i", str(a), "-i", str(b), "-o", str(tmp_path / "x.png"),
                    *run)
    assert first.exit_code == 0, first.output
    assert "output is 48x32, input is 60x40" in first.stderr
    assert qimg.read_params(tmp_path / "x.png")["images"] == [str(a), str(b)]

    emb = tmp_path / "e.safetensors"
    encoded = _invoke("encode-prompt", "put the cat on the sofa", "-i", str(a), "-i", str(b), "-o", str(emb),
                      *common)
    assert encoded.exit_code == 0, encoded.output
    second = _invoke("edit", "-i", str(a), "-i", str(b), "-o", str(tmp_path / "y.png"), "--prompt-embeds",
                     str(emb), *run)
    assert second.exit_code == 0, second.output
    assert _pixels(tmp_path / "x.png") == _pixels(tmp_path / "y.png")

    kept = _invoke("edit", "put the cat on the sofa", "-i", str(a), "-i", str(b), "-o", str(tmp_path / "k.png"),
                   "--keep-size", *run)
    assert kept.exit_code == 0, kept.output
    with Image.open(tmp_path / "k.png") as im:
        assert im.size == (60, 40)


def test_task_mismatch_is_a_usage_error(tiny_qwen_edit_2509_pipe_and_dir, tiny_qwen, tmp_path: Path) -> None:
    a = _picture(tmp_path / "a.png", (32, 32), 0)
    edit_model = str(tiny_qwen_edit_2509_pipe_and_dir[1])
    r = _invoke("generate", "a cat", "-o", str(tmp_path / "g.png"), "--model", edit_model)
    assert r.exit_code == 2 and "is an edit model" in r.stderr
    r = _invoke("edit", "a cat", "-i", str(a), "-o", str(tmp_path / "e.png"), "--model", str(tiny_qwen))
    assert r.exit_code == 2 and "is a text-to-image model" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
