"""qimg generate end to end with a fake pipeline behind qimg.load: messages, metadata, progress."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

import qimg
from qimg.cli.commands.generate import cfg_summary
from qimg.cli.main import app


def _run(runner: CliRunner, model: Path, out: Path, *args: str, env: dict[str, str] | None = None):
    argv = ["generate", "a red fox in snow", "-o", str(out), "--model", str(model), *args]
    return runner.invoke(app, argv, prog_name="qimg", env=env)


def test_writes_png_with_parameters(
    runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list
) -> None:
    out = out_dir / "fox.png"
    result = _run(runner, fake_model, out, "--seed", "7", "--steps", "3", "--width", "64", "--height", "48")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # stdout stays clean for machine-readable use
    lines = result.stderr.splitlines()
    assert "seed: 7" in lines
    assert 'CFG on (scale 4.0, negative " ")' in lines
    assert lines[-1].startswith(f"wrote {out} (seed 7, ") and lines[-1].endswith(" s)")
    with Image.open(out) as im:
        assert im.size == (64, 48)
    params = qimg.read_params(out)
    assert params["prompt"] == "a red fox in snow"
    assert (params["seed"], params["steps"], params["width"], params["height"]) == (7, 3, 64, 48)
    assert params["model"] == str(fake_model)
    assert [p.name for p in out_dir.iterdir()] == ["fox.png"]  # no temporary file left


def test_passes_device_and_dtype(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list) -> None:
    result = _run(runner, fake_model, out_dir / "a.png", "--device", "cuda:1", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    (pipe,) = fake_load
    assert (pipe.device, pipe.dtype) == ("cuda:1", "float16")
    assert pipe.model.path == fake_model.resolve()  # the resolved ModelRef, not the raw string
    assert "on cuda:1 (float16)" in result.stderr


def test_tiled_vae_options_reach_the_loader(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list):
    assert _run(runner, fake_model, out_dir / "a.png").exit_code == 0
    assert _run(runner, fake_model, out_dir / "b.png", "--tiled-vae").exit_code == 0
    assert _run(runner, fake_model, out_dir / "c.png", "--tile-size", "256").exit_code == 0
    tilings = [p.vae_tiling for p in fake_load]
    assert tilings[0] is None
    assert (tilings[1].tile, tilings[1].overlap) == (512, 64) and (tilings[2].tile, tilings[2].overlap) == (256, 64)


def test_runtime_options_reach_the_loader(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list):
    assert _run(runner, fake_model, out_dir / "a.png").exit_code == 0
    result = _run(runner, fake_model, out_dir / "b.png", "--attention", "sdpa", "--compile", "--fp8", "compute",
                  "--offload", "layer", "--vram-budget", "8", "--text-encoder-device", "cpu")
    assert result.exit_code == 0, result.output
    assert fake_load[0].options == qimg.RuntimeOptions()
    assert fake_load[0].shape == qimg.RequestShape(1024, 1024, cfg=True, ref_pixels=0, text_encoder=True)
    keys = ("attention", "compile", "fp8", "offload", "vram_budget", "text_encoder_device")
    assert {k: getattr(fake_load[1].options, k) for k in keys} == {
        "attention": "sdpa", "compile": True, "fp8": "compute", "offload": "layer", "vram_budget": 8.0,
        "text_encoder_device": "cpu"}
    for flags in (("--fp8", "int4"), ("--offload", "disk"), ("--vram-budget", "0"), ("--text-encoder-device", "tpu")):
        bad = _run(runner, fake_model, out_dir / "c.png", *flags)
        assert bad.exit_code == 2, flags
    assert len(fake_load) == 2


def test_random_seed_is_printed_and_stored(
    runner: CliRunner, fake_model: Path, out_dir: Path, fake_load
) -> None:
    out = out_dir / "a.png"
    result = _run(runner, fake_model, out, "--steps", "1", "--width", "32", "--height", "32")
    assert result.exit_code == 0, result.output
    (seed_line,) = [line for line in result.stderr.splitlines() if line.startswith("seed: ")]
    assert int(seed_line.removeprefix("seed: ")) == qimg.read_params(out)["seed"]


def test_cfg_off_and_snap_warning(
    runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list
) -> None:
    result = _run(runner, fake_model, out_dir / "a.png", "--cfg", "1", "--width", "100", "--height", "64")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "CFG off (scale 1.0)" in lines
    assert "warning: width 100 is not a multiple of 16; using 96" in lines
    assert fake_load[0].requests[0].width == 96


def test_negative_prompt_is_used(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list) -> None:
    out = out_dir / "a.png"
    result = _run(runner, fake_model, out, "--negative", "blurry", "--cfg", "3.5", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert 'CFG on (scale 3.5, negative "blurry")' in result.stderr.splitlines()
    assert qimg.read_params(out)["negative"] == "blurry"


def test_cfg_summary_without_negative() -> None:
    request = qimg.GenerateRequest(
        prompt="p", negative=None, seed=1, steps=1, cfg=4.0, width=16, height=16, max_sequence_length=8
    )
    assert cfg_summary(request) == "CFG off (no negative prompt)"


def test_quiet_prints_nothing(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list) -> None:
    result = _run(runner, fake_model, out_dir / "a.png", "--quiet", "--width", "100", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert (out_dir / "a.png").is_file()


def test_overwrite(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list) -> None:
    out = out_dir / "a.png"
    out.write_bytes(b"old")
    result = _run(runner, fake_model, out, "--overwrite", "--seed", "5", "--steps", "1")
    assert result.exit_code == 0, result.output
    assert qimg.read_params(out)["seed"] == 5


def test_progress_bar_and_spinner_on_a_terminal(
    runner, fake_model: Path, out_dir: Path, fake_load: list
) -> None:
    """TTY_COMPATIBLE=1 makes rich treat the captured stderr as a terminal: the live widgets run for real."""
    result = _run(runner, fake_model, out_dir / "a.png", "--steps", "4", env={"TTY_COMPATIBLE": "1"})
    assert result.exit_code == 0, result.output
    assert "denoising" in result.stderr
    assert "4/4" in result.stderr
    assert (out_dir / "a.png").is_file()
