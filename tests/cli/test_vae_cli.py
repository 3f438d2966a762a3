"""qimg vae roundtrip through Typer's CliRunner, on a tiny random VAE on the CPU: output, metadata, latents file,
quiet mode, and bad input failing with one line, exit 1 and no file written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app as main_app
from qimg.loading.hub import QWEN_IMAGE_COMPONENTS
from tests.fixtures import TINY_VAE, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return main_app


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder whose vae/ holds the tiny random VAE (diffusers' own save); other components are markers."""
    from diffusers import AutoencoderKLQwenImage

    root = tmp_path_factory.mktemp("model")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    randomize_(AutoencoderKLQwenImage(**TINY_VAE).eval(), seed=0).save_pretrained(root / "vae")
    for component, marker in QWEN_IMAGE_COMPONENTS.items():
        (root / component).mkdir(exist_ok=True)
        if not (root / component / marker).exists():
            (root / component / marker).write_text("{}")
    return root


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("in") / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((100, 70), Image.BICUBIC).save(path)
    return path


def _run(runner: CliRunner, app: typer.Typer, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["vae", "roundtrip", *args], prog_name="qimg", env=env)


def _one_error(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    return errors[0]


def test_help_lists_options_and_examples(runner: CliRunner, app: typer.Typer) -> None:
    result = runner.invoke(app, ["vae", "--help"], prog_name="qimg")
    assert result.exit_code == 0 and "roundtrip" in result.stdout
    result = runner.invoke(app, ["vae", "roundtrip", "--help"], prog_name="qimg")
    assert result.exit_code == 0
    assert "qimg vae roundtrip photo.jpg" in result.stdout.split("Examples:")[1]
    for option in ("--output", "--model", "QIMG_MODEL", "--device", "--dtype", "--tiled-vae", "--tile-size",
                   "--tile-overlap", "--latents", "--quiet", "--overwrite", "--debug"):  # fmt: skip
        assert option in result.stdout, option


def test_roundtrip_writes_png_and_latents(runner: CliRunner, app, model: Path, picture: Path, out_dir: Path) -> None:
    out, lat = out_dir / "rt.png", out_dir / "z.safetensors"
    result = _run(runner, app, str(picture), "-o", str(out), "--model", str(model), "--device", "cpu",
                  "--latents", str(lat))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"loaded the VAE of {model} in ")
    assert lines[1].startswith("note: cropped 100x70 to 96x64 (left 2, right 2, top 3, bottom 3 px)")
    assert lines[2] == "96x64 on cpu (float32, untiled)"
    assert lines[3].startswith("PSNR ") and " dB, SSIM " in lines[3]
    assert lines[4].startswith("encode ") and ", decode " in lines[4]
    assert lines[5].startswith(f"wrote {out} and {lat} (")
    params = qimg.read_params(out)
    assert f"PSNR {params['psnr']:.2f} dB, SSIM {params['ssim']:.4f}" == lines[3]
    assert params["source"] == str(picture) and params["model"] == str(model)
    with Image.open(out) as im:
        assert im.size == (96, 64)
    from safetensors import safe_open

    with safe_open(str(lat), "pt") as f:
        assert f.get_tensor("latents").shape == (1, 16, 8, 12)
        assert f.metadata()["latents"] == "raw_posterior_mean"
    assert sorted(p.name for p in out_dir.iterdir()) == ["rt.png", "z.safetensors"]


def test_only_what_is_over_a_multiple_of_8_is_cropped(runner: CliRunner, app, model: Path, out_dir: Path,
                                                       tmp_path: Path) -> None:
    from skimage import data

    picture = tmp_path / "odd.png"
    Image.fromarray(data.astronaut()).resize((203, 201), Image.BICUBIC).save(picture)
    out = out_dir / "rt.png"
    result = _run(runner, app, str(picture), "-o", str(out), "--model", str(model), "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[1].startswith("note: cropped 203x201 to 200x200 (left 1, right 2, top 0, bottom 1 px)")
    assert lines[2] == "200x200 on cpu (float32, untiled)"
    with Image.open(out) as im:
        assert im.size == (200, 200)


def test_tiled_quiet_and_model_from_env(runner: CliRunner, app, model: Path, picture: Path, out_dir: Path) -> None:
    out = out_dir / "rt.png"
    result = _run(runner, app, str(picture), "-o", str(out), "--tile-size", "32", "--tile-overlap", "16", "-q",
                  "--dtype", "float32", env={"QIMG_MODEL": str(model)})
    assert result.exit_code == 0, result.output
    assert result.output == ""
    params = qimg.read_params(out)
    assert (params["tile_size"], params["tile_overlap"], params["dtype"]) == (32, 16, "float32")


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--tile-size", "100"], "not a multiple of 8"),
        (["--tiled-vae", "--tile-overlap", "512"], "smaller than the tile size"),
        (["--latents", "z.pt"], ".safetensors"),
    ],
)
def test_bad_options_fail_before_loading(runner, app, model, picture, out_dir, monkeypatch, extra, words) -> None:
    monkeypatch.setattr(qimg, "load_vae", lambda *a, **k: pytest.fail("loaded despite bad input"), raising=False)
    extra = [str(out_dir / e) if e.endswith(".pt") else e for e in extra]
    result = _run(runner, app, str(picture), "-o", str(out_dir / "rt.png"), "--model", str(model), *extra)
    assert words in _one_error(result)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("content", [None, b"not an image", "truncated"])
def test_bad_image_fails_with_one_line(runner, app, model, picture, out_dir, tmp_path, monkeypatch, content) -> None:
    monkeypatch.setattr(qimg, "load_vae", lambda *a, **k: pytest.fail("loaded despite bad input"), raising=False)
    bad = tmp_path / "bad.png"
    if content == "truncated":
        bad.write_bytes(picture.read_bytes()[:-300])
    elif content is not None:
        bad.write_bytes(content)
    result = _run(runner, app, str(bad), "-o", str(out_dir / "rt.png"), "--model", str(model))
    assert ("does not exist" if content is None else "not a readable image") in _one_error(result)
    assert list(out_dir.iterdir()) == []


def test_existing_output_and_missing_model(runner, app, model, picture, out_dir, tmp_path) -> None:
    (out_dir / "rt.png").write_bytes(b"keep")
    result = _run(runner, app, str(picture), "-o", str(out_dir / "rt.png"), "--model", str(model))
    assert "already exists" in _one_error(result)
    assert (out_dir / "rt.png").read_bytes() == b"keep"
    result = _run(runner, app, str(picture), "-o", str(out_dir / "b.png"), "--model", str(tmp_path / "nowhere"))
    assert "does not exist" in _one_error(result)
    result = _run(runner, app, str(picture), "-o", str(out_dir / "b.png"))
    assert "no model given" in _one_error(result, code=2)
    assert [p.name for p in out_dir.iterdir()] == ["rt.png"]


def test_internal_error_and_debug(runner, app, model, picture, out_dir, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("kaput")

    monkeypatch.setattr(qimg, "vae_roundtrip", boom, raising=False)
    args = [str(picture), "-o", str(out_dir / "rt.png"), "--model", str(model), "--device", "cpu"]
    assert "internal error: RuntimeError: kaput" in _one_error(_run(runner, app, *args))
    result = _run(runner, app, *args, "--debug")
    assert result.exit_code == 1 and "Traceback" in result.stderr
    assert list(out_dir.iterdir()) == []
