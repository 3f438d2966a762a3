"""qimg generate on a real tiny model (the session fixture `tiny_qwen` from tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
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

    # Where the time went, stored and (with -v) printed: the pipeline's phases, then load and write around them.
    assert set(params["timings"]) == {"place", "text", "denoise", "decode"}
    assert all(v >= 0 for v in params["timings"].values()) and params["timings"]["denoise"] > 0
    assert not any(line.startswith("time:") for line in first.stderr.splitlines())

    second = runner.invoke(app, [*argv, "-v"], prog_name="qimg")
    assert second.exit_code == 0, second.output
    with Image.open(out) as im:
        assert im.convert("RGB").tobytes() == pixels  # same seed, same image
    line = next(line for line in second.stderr.splitlines() if line.startswith("time:"))
    for part in ("load ", "text ", "denoise ", "s/step)", "decode ", "write ", "since the process started"):
        assert part in line, line


def _run(*argv: str):
    result = CliRunner().invoke(app, list(argv), prog_name="qimg")
    assert result.exit_code == 0, result.output
    return result


def _pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


@pytest.mark.slow
def test_compile_saves_a_package_that_the_next_run_loads(tiny_qwen: Path, tmp_path: Path) -> None:
    argv = ["generate", "a red fox", "--model", str(tiny_qwen), "--steps", "2", "--width", "32", "--height", "32",
            "--seed", "5", "--device", "cpu", "--overwrite"]
    _run(*argv, "-o", str(tmp_path / "eager.png"))
    first = _run(*argv, "-o", str(tmp_path / "first.png"), "--compile")
    packages = sorted((Path(os.environ["QIMG_HOME"]) / "compile" / "aoti").glob("*/*.pt2"))
    assert len(packages) == 1  # CFG's prompt and negative in one batch: one block class, one package
    second = _run(*argv, "-o", str(tmp_path / "second.png"), "--compile")
    assert sorted(packages[0].parent.parent.glob("*/*.pt2")) == packages  # loaded, not rebuilt
    assert "could not package" not in first.stderr + second.stderr
    eager, compiled = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("eager", "first"))
    assert np.abs(eager - compiled).max() <= 1  # fp32 sums in another order: at most one level in a rounding
    assert _pixels(tmp_path / "second.png") == _pixels(tmp_path / "first.png")


def test_encode_prompt_then_prompt_embeds_equals_the_prompt_run(tiny_qwen: Path, tmp_path: Path) -> None:
    common = ["--model", str(tiny_qwen), "--device", "cpu"]
    size = ["--steps", "2", "--width", "32", "--height", "32", "--seed", "11"]
    emb = tmp_path / "fox.safetensors"
    result = _run("encode-prompt", "a red fox", "-o", str(emb), *common)
    assert "wrote" in result.stderr and emb.is_file()
    _run("generate", "a red fox", "-o", str(tmp_path / "a.png"), *common, *size)
    b = _run("generate", "-o", str(tmp_path / "b.png"), "--prompt-embeds", str(emb), *common, *size)
    assert 'CFG on (scale 4.0, negative " ")' in b.stderr
    assert _pixels(tmp_path / "a.png") == _pixels(tmp_path / "b.png")
    params = qimg.read_params(tmp_path / "b.png")
    assert params["prompt"] == "a red fox" and params["prompt_embeds"] == str(emb)


def test_prompt_embeds_of_another_family_are_refused(tiny_qwen: Path, tmp_path: Path) -> None:
    data = qimg.encode_prompt(tiny_qwen, "a red fox", device="cpu")
    data.meta["family"] = "flux"
    emb = qimg.save_embeddings(tmp_path / "flux.safetensors", data)
    result = CliRunner().invoke(
        app, ["generate", "-o", str(tmp_path / "x.png"), "--prompt-embeds", str(emb), "--model", str(tiny_qwen),
              "--steps", "1", "--width", "32", "--height", "32"], prog_name="qimg")
    assert result.exit_code == 1
    assert "made for flux" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_img2img_and_inpainting_from_the_cli(tiny_qwen: Path, tmp_path: Path) -> None:
    import numpy as np

    init = tmp_path / "init.png"
    Image.fromarray((np.indices((40, 60)).sum(0) % 256).astype(np.uint8)).convert("RGB").save(init)
    mask = tmp_path / "mask.png"
    m = np.zeros((40, 60), np.uint8)
    m[:, 30:] = 255
    Image.fromarray(m).save(mask)
    common = ["--model", str(tiny_qwen), "--device", "cpu", "--steps", "3", "--seed", "2"]
    r = _run("generate", "a red fox", "-o", str(tmp_path / "i2i.png"), "--init-image", str(init), *common)
    # 60x40 keeps its aspect at the model's 1 MP default area: 1248x832 would be slow on CPU, so size it.
    assert "init image is 60x40" in r.stderr
    _run("generate", "a red fox", "-o", str(tmp_path / "small.png"), "--init-image", str(init), "--width", "48",
         "--height", "32", "--strength", "0.5", *common)
    _run("generate", "a red fox", "-o", str(tmp_path / "inpaint.png"), "--init-image", str(init), "--mask",
         str(mask), "--width", "48", "--height", "32", *common)
    params = qimg.read_params(tmp_path / "inpaint.png")
    assert params["strength"] == 0.6 and params["init_image"] == str(init) and params["mask"] == str(mask)
    assert qimg.read_params(tmp_path / "small.png")["strength"] == 0.5
    with Image.open(tmp_path / "i2i.png") as im:
        assert im.size == (1248, 832)


def test_tiled_vae_on_generate(tiny_qwen: Path, tmp_path: Path) -> None:
    import numpy as np

    common = ["a red fox", "--model", str(tiny_qwen), "--device", "cpu", "--steps", "2", "--seed", "5",
              "--width", "96", "--height", "64"]
    _run("generate", *common, "-o", str(tmp_path / "plain.png"))
    _run("generate", *common, "-o", str(tmp_path / "tiled.png"), "--tile-size", "48", "--tile-overlap", "16")
    with Image.open(tmp_path / "plain.png") as a, Image.open(tmp_path / "tiled.png") as b:
        plain, tiled = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert plain.shape == tiled.shape == (64, 96, 3)
    # Tiles see less context than the whole image (random tiny VAE), so close but not equal.
    assert 0 < np.abs(plain - tiled).mean() < 0.05 * 255
    bad = CliRunner().invoke(app, ["generate", *common, "-o", str(tmp_path / "bad.png"), "--tile-size", "100"],
                             prog_name="qimg")
    assert bad.exit_code == 1 and "multiple of 8" in bad.stderr and not (tmp_path / "bad.png").exists()
