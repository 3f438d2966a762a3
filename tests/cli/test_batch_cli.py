"""qimg generate --prompts with a fake pipeline behind qimg.load: exit codes, what is written and skipped, --json,
failures, stdin, and the options that exclude each other."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app

from .conftest import FakePipeline

SMALL = ["--steps", "2", "--width", "32", "--height", "32"]


def _batch(runner: CliRunner, model: Path, prompts: Path | str, out: Path, *args: str, input: str | None = None):
    argv = ["generate", "--prompts", str(prompts), "-o", str(out), "--model", str(model), *SMALL, *args]
    return runner.invoke(app, argv, prog_name="qimg", input=input)


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# assets\na red fox\n\na blue bird\na green frog\n", encoding="utf-8")
    return path


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png")


def test_batch_writes_loads_once_and_reruns_skip(runner, fake_model, prompts, tmp_path, fake_load) -> None:
    out = tmp_path / "out"
    first = _batch(runner, fake_model, prompts, out)
    assert first.exit_code == 0, first.output
    assert first.stdout == ""  # without --json stdout stays empty
    assert _pngs(out) == ["0000-a-red-fox.png", "0001-a-blue-bird.png", "0002-a-green-frog.png"]
    assert len(fake_load) == 1 and len(fake_load[0].requests) == 3  # the model loads once
    assert "[2/3] wrote" in first.stderr and "done: 3 written, 0 skipped, 0 failed" in first.stderr
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(m["path"], m["line"], m["prompt"]) for m in manifest] == [
        ("0000-a-red-fox.png", 2, "a red fox"), ("0001-a-blue-bird.png", 4, "a blue bird"),
        ("0002-a-green-frog.png", 5, "a green frog"),
    ]
    assert all({"seed", "steps", "cfg", "model", "qimg_version", "seconds"} <= set(m) for m in manifest)
    mtimes = [(out / name).stat().st_mtime_ns for name in _pngs(out)]

    again = _batch(runner, fake_model, prompts, out, "--json")
    assert again.exit_code == 0, again.output
    events = [json.loads(line) for line in again.stdout.splitlines()]
    assert [(e["event"], e["reason"]) for e in events] == [("skipped", "unchanged")] * 3
    assert len(fake_load) == 1  # everything done: the model is not even loaded
    assert [(out / name).stat().st_mtime_ns for name in _pngs(out)] == mtimes
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3


def test_changed_parameters_regenerate_and_overwrite_forces(runner, fake_model, prompts, tmp_path, fake_load):
    out = tmp_path / "out"
    assert _batch(runner, fake_model, prompts, out, "--seed", "10").exit_code == 0
    assert [r.seed for r in fake_load[0].requests] == [10, 11, 12]  # --seed is a base: line i gets 10 + i
    result = _batch(runner, fake_model, prompts, out, "--seed", "10", "--cfg", "2", "--json")
    assert result.exit_code == 0, result.output
    assert "regenerating" in result.stderr and "(cfg differ)" in result.stderr
    assert qimg.read_params(out / "0000-a-red-fox.png")["cfg"] == 2.0
    forced = _batch(runner, fake_model, prompts, out, "--seed", "10", "--cfg", "2", "--overwrite", "--json")
    assert [json.loads(line)["event"] for line in forced.stdout.splitlines()] == ["written"] * 3
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 9
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_json_lines_per_image(runner, fake_model, tmp_path, fake_load) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat", "name": "cat", "seed": 5, "steps": 3}\n{"prompt": "a dog"}\n')
    result = _batch(runner, fake_model, path, tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    cat, dog = (json.loads(line) for line in result.stdout.splitlines())
    assert (cat["event"], cat["path"], cat["seed"], cat["steps"], cat["line"]) == (
        "written", str(tmp_path / "out" / "cat.png"), 5, 3, 1)
    assert dog["path"].endswith("0001-a-dog.png") and dog["steps"] == 2 and "seconds" in dog


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "a"}\n{"prompt": "b", "stepz": 3}\n', "p.jsonl:2: unknown key 'stepz'"),
        ('{"prompt": "a"}\n{"prompt": "b", "steps": 0}\n', 'p.jsonl:2: "steps" must be between 1 and 1000'),
        ('{"prompt": "a", "name": "x"}\n{"prompt": "b", "name": "x"}\n', "is also the name of line 1"),
        ('{"prompt": "a"}\n\n{"prompt": "b"\n', "p.jsonl:3: not valid JSON"),
    ],
    ids=["unknown-key", "bad-value", "duplicate-name", "bad-json"],
)
def test_a_bad_line_is_exit_2_and_nothing_is_written(runner, fake_model, tmp_path, fake_load, text, message) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    out = tmp_path / "out"
    result = _batch(runner, fake_model, path, out)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and str(path) in errors[0]
    assert "Traceback" not in result.output
    assert not out.exists() and fake_load == []


def test_failing_lines_are_reported_and_the_batch_goes_on(runner, fake_model, prompts, tmp_path, monkeypatch):
    class NaNOnBirds(FakePipeline):
        def generate(self, *, request: qimg.GenerateRequest, progress: Any = None, **inputs: Any) -> list[Any]:
            if "bird" in request.prompt:
                raise qimg.QimgError("the sampler produced NaN or infinite values", hint="use float32")
            return super().generate(request=request, progress=progress, **inputs)

    monkeypatch.setattr(qimg, "load", lambda model, options=None, **kw: NaNOnBirds(model, None, None))
    out = tmp_path / "out"
    result = _batch(runner, fake_model, prompts, out, "--json")
    assert result.exit_code == 1, result.output
    assert [json.loads(line)["event"] for line in result.stdout.splitlines()] == ["written", "failed", "written"]
    assert f"error: {prompts}:4: the sampler produced NaN or infinite values" in result.stderr.splitlines()
    assert result.stderr.splitlines()[-2] == "error: 1 of 3 images failed"
    assert _pngs(out) == ["0000-a-red-fox.png", "0002-a-green-frog.png"]

    fast = _batch(runner, fake_model, prompts, tmp_path / "fast", "--fail-fast")
    assert fast.exit_code == 1
    assert "error: 1 of 3 images failed; stopped with 1 not run (--fail-fast)" in fast.stderr
    assert _pngs(tmp_path / "fast") == ["0000-a-red-fox.png"]


def test_stdin_sniffing_and_forced_csv(runner, fake_model, tmp_path, fake_load) -> None:
    out = tmp_path / "out"
    result = _batch(runner, fake_model, "-", out, "--json", input='{"prompt": "a fox", "name": "fox"}\n')
    assert result.exit_code == 0, result.output
    assert _pngs(out) == ["fox.png"]
    result = _batch(runner, fake_model, "-", out, "--prompts-format", "csv", input="prompt,name\n\"a, b\",ab\n")
    assert result.exit_code == 0, result.output
    assert qimg.read_params(out / "ab.png")["prompt"] == "a, b"
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])["source"] == "<stdin>"


def test_name_template(runner, fake_model, prompts, tmp_path, fake_load) -> None:
    out = tmp_path / "out"
    result = _batch(runner, fake_model, prompts, out, "--name-template", "{seed}-{slug}.png", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert _pngs(out) == ["3-a-red-fox.png", "4-a-blue-bird.png", "5-a-green-frog.png"]
    bad = _batch(runner, fake_model, prompts, out, "--name-template", "{nam}.png")
    assert bad.exit_code == 2 and "unknown field {nam}" in bad.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["a fox", "--prompts", "p.txt"],
        ["--prompts", "p.txt", "--prompt-embeds", "e.safetensors"],
        ["--prompts", "p.txt", "--from", "a.png"],
        ["--prompts", "p.txt", "--init-image", "a.png"],
        ["--prompts", "{prompts}", "-o", "{out}/x.png"],
    ],
    ids=["prompt", "prompt-embeds", "from", "init-image", "png-output"],
)
def test_exclusive_sources_are_usage_errors(runner, fake_model, prompts, out_dir, fake_load, args) -> None:
    args = [a.format(prompts=prompts, out=out_dir) for a in args]
    output = [] if "-o" in args else ["-o", str(out_dir)]
    result = runner.invoke(app, ["generate", *args, *output, "--model", str(fake_model)], prog_name="qimg")
    assert result.exit_code == 2, result.output
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert list(out_dir.iterdir()) == [] and fake_load == []


def test_bad_options_fail_before_loading(runner, fake_model, prompts, tmp_path, fake_load) -> None:
    result = _batch(runner, fake_model, prompts, tmp_path / "out", "--steps", "0")
    assert result.exit_code == 1 and "--steps" in result.stderr
    missing = _batch(runner, fake_model, tmp_path / "none.txt", tmp_path / "out")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    deep = _batch(runner, fake_model, prompts, tmp_path / "a" / "b")
    assert deep.exit_code == 1 and "does not exist" in deep.stderr
    assert fake_load == [] and not (tmp_path / "out").exists()


def test_sigterm_during_a_batch_exits_130(runner, fake_model, prompts, tmp_path, monkeypatch) -> None:
    class TermOnSecond(FakePipeline):
        def generate(self, *, request: qimg.GenerateRequest, progress: Any = None, **inputs: Any) -> list[Any]:
            if len(self.requests) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # handled as Ctrl-C: nothing of this image is written
            return super().generate(request=request, progress=progress, **inputs)

    monkeypatch.setattr(qimg, "load", lambda model, options=None, **kw: TermOnSecond(model, None, None))
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    result = _batch(runner, fake_model, prompts, out)
    assert result.exit_code == 130, result.output
    assert result.stderr.splitlines()[-1] == "interrupted"
    assert sorted(p.name for p in out.iterdir()) == ["0000-a-red-fox.png", "manifest.jsonl"]
    assert signal.getsignal(signal.SIGTERM) == before
