"""The metadata round trip: qimg info, generate --from (fake pipeline, then the real tiny model), --json on one
image, and the A1111-style `parameters` chunk other tools read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.png import a1111_parameters

from .conftest import make_fake_model


def _invoke(runner: CliRunner, *argv: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(argv), prog_name="qimg", env=env)


@pytest.fixture
def made(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list) -> Path:
    """A PNG written by `qimg generate` (fake pipeline) with a negative prompt and a non-default everything."""
    out = out_dir / "fox.png"
    result = _invoke(runner, "generate", "a red fox, in snow", "-o", str(out), "--model", str(fake_model), "--seed",
                     "7", "--steps", "3", "--cfg", "2.5", "--negative", "blurry", "--width", "64", "--height", "48")
    assert result.exit_code == 0, result.output
    return out


def test_info_prints_the_parameters(runner: CliRunner, made: Path, fake_model: Path) -> None:
    result = _invoke(runner, "info", str(made))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:5] == ['prompt: "a red fox, in snow"', 'negative: "blurry"', "seed: 7", "steps: 3", "cfg: 2.5"]
    assert f"model: {json.dumps(str(fake_model))}" in lines
    as_json = _invoke(runner, "info", str(made), "--json")
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == qimg.read_params(made)


@pytest.mark.parametrize("content", ["plain", b"not an image", None], ids=["no-params", "garbage", "missing"])
def test_info_fails_with_one_line(runner: CliRunner, tmp_path: Path, content) -> None:
    path = tmp_path / "x.png"
    if content == "plain":
        Image.new("RGB", (8, 8)).save(path)
    elif content is not None:
        path.write_bytes(content)
    result = _invoke(runner, "info", str(path))
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "Traceback" not in result.output
    if content == "plain":
        assert errors[0] == f"error: {path} carries no qimg parameters"


def test_a1111_parameters_chunk(made: Path) -> None:
    with Image.open(made) as im:
        text = im.info["parameters"]
    prompt, negative, settings = text.split("\n")
    assert (prompt, negative) == ("a red fox, in snow", "Negative prompt: blurry")
    assert settings.startswith("Steps: 3, Sampler: Euler, CFG scale: 2.5, Seed: 7, Size: 64x48, Model: model, ")
    assert settings.endswith(f"Version: qimg {qimg.__version__}")
    # A1111 quotes values holding a comma or colon; the default negative (a space) is no negative to a reader.
    odd = a1111_parameters({"prompt": "p", "negative": " ", "steps": 1, "model": "/m/Qwen, v2", "strength": 0.5})
    assert odd == 'p\nSteps: 1, Sampler: Euler, Model: "Qwen, v2", Denoising strength: 0.5'


def test_from_replays_with_the_stored_model(runner, made: Path, out_dir: Path, tmp_path: Path, fake_load) -> None:
    other = make_fake_model(tmp_path / "other-model")
    # QIMG_MODEL does not override the stored model: a replay should make the same image.
    result = _invoke(runner, "generate", "--from", str(made), "-o", str(out_dir / "again.png"),
                     env={"QIMG_MODEL": str(other)})
    assert result.exit_code == 0, result.output
    first, again = fake_load[0].requests[0], fake_load[1].requests[0]
    assert again == first
    assert fake_load[1].model.path == fake_load[0].model.path
    assert qimg.read_params(out_dir / "again.png") == qimg.read_params(made)


def test_from_explicit_options_win(runner, made: Path, out_dir: Path, tmp_path: Path, fake_load) -> None:
    other = make_fake_model(tmp_path / "other-model")
    result = _invoke(runner, "generate", "a red fox at night", "--from", str(made), "-o", str(out_dir / "b.png"),
                     "--steps", "5", "--model", str(other), "--json")
    assert result.exit_code == 0, result.output
    request = fake_load[-1].requests[0]
    assert (request.prompt, request.steps, request.seed, request.negative, request.cfg) == (
        "a red fox at night", 5, 7, "blurry", 2.5)
    assert (request.width, request.height) == (64, 48)
    assert fake_load[-1].model.path == other.resolve()
    line = json.loads(result.stdout)  # --json on one image: one object
    assert (line["event"], line["path"], line["steps"]) == ("written", str(out_dir / "b.png"), 5)


def test_from_replays_init_image_and_strength(runner, fake_model, out_dir: Path, tmp_path: Path, fake_load) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(init)
    first = out_dir / "i2i.png"
    assert _invoke(runner, "generate", "a fox", "-o", str(first), "--model", str(fake_model), "--init-image",
                   str(init), "--strength", "0.4", "--width", "32", "--height", "32").exit_code == 0
    result = _invoke(runner, "generate", "--from", str(first), "-o", str(out_dir / "again.png"))
    assert result.exit_code == 0, result.output
    assert fake_load[1].requests[0].strength == 0.4 and "init_image" in fake_load[1].inputs


def test_from_failures(runner, made: Path, out_dir: Path, tmp_path: Path, fake_load: list) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = _invoke(runner, "generate", "--from", str(plain), "-o", str(out_dir / "x.png"))
    assert result.exit_code == 1 and "carries no qimg parameters" in result.stderr
    params = qimg.read_params(made)
    moved = out_dir / "moved.png"
    qimg.save_png(Image.open(made), moved, {**params, "model": str(tmp_path / "gone")})
    result = _invoke(runner, "generate", "--from", str(moved), "-o", str(out_dir / "y.png"))
    assert result.exit_code == 1, result.output
    assert f"(the model recorded in {moved})" in result.stderr and "pass --model" in result.stderr
    assert not (out_dir / "x.png").exists() and not (out_dir / "y.png").exists()


def test_from_reproduces_the_pixels_on_the_tiny_model(tiny_qwen: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    first = tmp_path / "a.png"
    made = _invoke(runner, "generate", "a red fox", "-o", str(first), "--model", str(tiny_qwen), "--steps", "2",
                   "--width", "32", "--height", "32", "--device", "cpu")  # random seed: stored, then replayed
    assert made.exit_code == 0, made.output
    again = _invoke(runner, "generate", "--from", str(first), "-o", str(tmp_path / "b.png"), "--device", "cpu")
    assert again.exit_code == 0, again.output
    with Image.open(first) as a, Image.open(tmp_path / "b.png") as b:
        assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def test_every_command_help_has_examples(runner: CliRunner) -> None:
    from qimg.cli import gendocs

    for command in gendocs.COMMANDS:
        result = runner.invoke(app, [*command, "--help"], prog_name="qimg")
        assert result.exit_code == 0, command
        if "Commands:" not in result.stdout:  # a group's examples live with its subcommands
            assert "Examples:" in result.stdout.split("Options:")[-1], command
