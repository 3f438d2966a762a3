"""One image over several torchrun processes (--parallel cfg|seq|cfg+seq), gloo on the CPU: the same pixels as
one process for the same seed, one file written (by rank 0), and the usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qimg.cli.main import app

REPO = Path(__file__).resolve().parents[2]


def _args(model: Path, out: Path) -> list[str]:
    return ["generate", "a red fox in the snow", "-o", str(out), "--model", str(model), "--device", "cpu",
            "--steps", "3", "--width", "64", "--height", "64", "--seed", "3"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def one_process(tiny_qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image of one process, the reference every parallel mode must give."""
    out = tmp_path_factory.mktemp("one") / "one.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    single = subprocess.run([sys.executable, "-m", "qimg", *_args(tiny_qwen, out)], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode, ranks, extra", [("cfg", 2, []), ("seq", 2, ["--compile"]), ("cfg+seq", 4, [])],
                         ids=["cfg", "seq-compiled", "cfg+seq"])
def test_one_image_on_several_processes_equals_one_process(tiny_qwen: Path, one_process: Path, tmp_path: Path,
                                                           mode: str, ranks: int, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    shared = tmp_path / "shared"
    shared.mkdir()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                           "-m", "qimg", *_args(tiny_qwen, shared / "img.png"), "--parallel", mode, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in shared.iterdir()] == ["img.png"]  # rank 0 alone wrote, and no temporary is left
    # fp32: only attention's key order differs (keys arrive by rank), and compiled blocks (the all-to-alls are
    # functional collectives, traced with them) fuse differently: within one uint8 level, usually none
    assert np.abs(_pixels(shared / "img.png") - _pixels(one_process)).max() <= 1
    assert done.stderr.count("wrote ") == 1


def test_parallel_alone_is_refused_before_loading(tiny_qwen: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [*_args(tiny_qwen, tmp_path / "a.png"), "--parallel", "cfg"])
    assert result.exit_code != 0 and "runs alone" in result.output, result.output
    assert not (tmp_path / "a.png").exists()


def test_parallel_with_a_prompt_file_is_a_usage_error(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    result = CliRunner().invoke(app, ["generate", "--prompts", str(prompts), "-o", str(tmp_path / "o"),
                                      "--model", str(tmp_path), "--parallel", "seq"])
    assert result.exit_code == 2 and "--parallel shares one image" in result.output, result.output


def test_one_image_under_torchrun_needs_parallel(tiny_qwen: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, _args(tiny_qwen, tmp_path / "a.png"))
    assert result.exit_code == 2 and "needs --parallel" in result.output, result.output


_FLUX_ARGS = ["generate", "a red fox", "--device", "cpu", "--steps", "2", "--width", "64", "--height", "64", "--seed",
              "4", "--cfg", "2", "--negative", "blurry"]  # true CFG, so both branches exist for --parallel cfg


@pytest.fixture(scope="module")
def flux_one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny FLUX.1 folder and its image from one process (shared by the modes below)."""
    from tests.fixtures_flux_model import write_tiny_flux

    root = tmp_path_factory.mktemp("flux")
    write_tiny_flux(root / "flux")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, "-m", "qimg", *_FLUX_ARGS, "--model", str(root / "flux"), "-o",
                          str(root / "one.png")], cwd=REPO, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    return root / "flux", root / "one.png"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["seq", "cfg"])
def test_flux_image_on_two_processes_equals_one_process(flux_one_process: tuple[Path, Path], tmp_path: Path,
                                                        mode: str) -> None:
    model, one = flux_one_process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                          "qimg", *_FLUX_ARGS, "--model", str(model), "-o", str(tmp_path / "two.png"), "--parallel",
                          mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert np.abs(_pixels(tmp_path / "two.png") - _pixels(one)).max() <= 1


@pytest.mark.slow
def test_edit_on_two_processes_equals_one_process(tiny_qwen_edit_pipe_and_dir: tuple, tmp_path: Path) -> None:
    model = tiny_qwen_edit_pipe_and_dir[1]
    Image.new("RGB", (64, 48), (200, 30, 40)).save(tmp_path / "in.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["edit", "make it blue", "-i", str(tmp_path / "in.png"), "--model", str(model), "--device", "cpu",
            "--steps", "2", "--seed", "5"]
    one = subprocess.run([sys.executable, "-m", "qimg", *args, "-o", str(tmp_path / "one.png")], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    # the reference image's tokens follow the target's: the shares cut across that boundary
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                          "qimg", *args, "-o", str(tmp_path / "two.png"), "--parallel", "seq"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert np.abs(_pixels(tmp_path / "two.png") - _pixels(tmp_path / "one.png")).max() <= 1
