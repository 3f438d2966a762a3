"""The smaller defects of the newcomer's report, each held: symlinked outputs, --json on a failed single image,
singular counts, stage names on the bar, millisecond times, a long prompt stored once, Ctrl-C during imports,
the compile warning."""

from __future__ import annotations

import builtins
import json
import warnings
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import qimg
from qimg.cli.commands.batch import _seconds
from qimg.cli.main import app
from qimg.cli.output import STAGES, Output


def _gen(runner: CliRunner, model: Path, *args: str):
    return runner.invoke(app, ["generate", "a red fox", "--model", str(model), *args], prog_name="qimg")


def test_overwriting_through_a_symlink_replaces_its_target(runner, fake_model, out_dir, fake_load):
    target = out_dir / "real.png"
    target.write_bytes(b"old")
    link = out_dir / "link.png"
    link.symlink_to(target)
    result = _gen(runner, fake_model, "-o", str(link), "--overwrite")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert Image.open(target).format == "PNG"


def test_json_reports_a_failed_single_image(runner, fake_model, out_dir, fake_load):
    (out_dir / "a.png").write_bytes(b"x")
    result = _gen(runner, fake_model, "-o", str(out_dir / "a.png"), "--json")
    assert result.exit_code == 1
    event = json.loads(result.stdout.strip())
    assert event["event"] == "failed" and "already exists" in event["error"] and event["hint"]


def test_one_prompt_is_singular(runner, fake_model, tmp_path, fake_load):
    (tmp_path / "p.txt").write_text("a red fox\n")
    result = runner.invoke(app, ["generate", "--prompts", str(tmp_path / "p.txt"), "--model", str(fake_model),
                                 "-o", str(tmp_path / "out")], prog_name="qimg")
    assert result.exit_code == 0, result.output
    assert "1 prompt from" in result.stderr and "1 prompts" not in result.stderr


def test_fast_images_read_in_milliseconds_not_zero_seconds():
    assert _seconds(0.0042) == "4 ms" and _seconds(2.26) == "2.3 s" and _seconds(None) == "-"


def test_the_bar_names_each_stage(tiny_qwen, one_thread):
    """The pipeline tells the bar which stage it is in; the bar's words come from STAGES."""
    seen: list[str] = []
    job = qimg.prepare_generate(tiny_qwen, "a fox", steps=1, width=32, height=32,
                                init_image=Image.new("RGB", (32, 32)))
    qimg.load(job.ref, device="cpu").run(job, on_stage=seen.append)
    assert seen == ["prompt", "encode", "denoise", "decode"]
    assert set(seen) - {"denoise"} <= set(STAGES)
    with Output(quiet=True).steps("denoising") as bar:  # not a terminal: the bar is silent, the calls are safe
        bar.stage("prompt")
        bar(1, 2)


def test_a_long_prompt_is_stored_twice_at_most_and_compressed(tmp_path):
    prompt = "a lighthouse at dusk " * 20000  # ~420 kB
    image = Image.new("RGB", (32, 32))
    path = qimg.save_png(image, tmp_path / "a.png", {"prompt": prompt, "seed": 1})
    assert path.stat().st_size < len(prompt)  # the JSON chunk is compressed; no plain per-key copy
    assert qimg.read_params(path)["prompt"] == prompt


def test_ctrl_c_while_importing_qimg_is_quiet(monkeypatch, capsys):
    import _qimg_cli

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "qimg.cli.main":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        _qimg_cli.main()
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_compiling_silences_inductors_complex_operator_warning():
    from torch import nn

    from qimg.runtime.compile import compile_blocks

    compile_blocks([nn.Linear(2, 2)])  # compiles lazily: nothing runs here
    assert any(message is not None and "does not support code generation for complex" in message.pattern
               for _, message, *_ in warnings.filters)
