"""qimg bench on the tiny models: what it measures, that it writes nothing, and its refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from qimg.cli.main import app


def _bench(*argv: str):
    return CliRunner().invoke(app, ["bench", *argv], prog_name="qimg")


def test_bench_times_a_text_to_image_model_and_writes_nothing(tiny_qwen: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _bench("--model", str(tiny_qwen), "--steps", "3", "--width", "64", "--height", "48", "--runs", "2",
                    "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["request"] == {"width": 64, "height": 48, "steps": 3, "cfg": 4.0}
    assert len(data["runs"]) == 2 and data["s_per_image"] > 0 and data["s_per_step"] > 0
    assert data["load_s"] > 0 and data["first_image_s"] > 0 and data["peak_gib"] is None  # no GPU memory on a CPU
    # each run's pipeline phases, and its steps within its denoise phase
    run = data["runs"][0]
    assert set(run["timings"]) == {"place", "text", "denoise", "decode"}
    assert run["s_per_step"] <= run["timings"]["denoise"] <= run["seconds"]
    assert "first image:" in result.stderr and "image 2:" in result.stderr
    assert os.listdir(tmp_path) == []

    text = _bench("--model", str(tiny_qwen), "--steps", "2", "--width", "64", "--height", "48", "--runs", "1",
                  "--device", "cpu", "--cfg", "1")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].endswith("64x48, 2 steps") and lines[1].startswith("flags: ")
    assert "s/image" in lines[2] and "s/step" in lines[2] and "(median of 1)" in lines[2]


def test_bench_runs_an_edit_model_on_a_picture_it_makes(tiny_edit_model) -> None:
    _, folder = tiny_edit_model("edit-2511")
    result = _bench("--model", str(folder), "--steps", "2", "--width", "64", "--height", "64", "--runs", "1",
                    "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["request"]["width"] == 64


def test_bench_refuses_gpu_flags_on_the_cpu_and_bad_runs(tiny_qwen: Path) -> None:
    gpu = _bench("--model", str(tiny_qwen), "--device", "cpu", "--vram-budget", "8")
    assert gpu.exit_code == 1 and "manages GPU memory" in gpu.stderr and "Traceback" not in gpu.output
    runs = _bench("--model", str(tiny_qwen), "--runs", "0")
    assert runs.exit_code == 2
