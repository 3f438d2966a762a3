"""Exit codes and messages: 1 for qimg errors (one line + hint), 2 for usage, 130 for Ctrl-C; no tracebacks
unless --debug; and a failed run never leaves a file behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.loading.hub import QWEN_IMAGE_COMPONENTS

from .conftest import make_fake_model

REPO = Path(__file__).resolve().parents[2]


def _generate(runner: CliRunner, *args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["generate", "a red fox", *args], prog_name="qimg", env=env)


def _assert_one_error(result, code: int = 1) -> list[str]:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    return errors


def test_missing_model_dir(runner: CliRunner, tmp_path: Path, out_dir: Path, fake_load: list) -> None:
    result = _generate(runner, "-o", str(out_dir / "a.png"), "--model", str(tmp_path / "nowhere"))
    (line,) = _assert_one_error(result)
    assert "does not exist" in line
    assert "hint:" in result.stderr
    assert list(out_dir.iterdir()) == []
    assert fake_load == []  # failed before loading anything


def test_model_dir_missing_a_component(
    runner: CliRunner, tmp_path: Path, out_dir: Path, fake_load: list
) -> None:
    partial = {k: v for k, v in QWEN_IMAGE_COMPONENTS.items() if k in ("transformer", "vae")}
    model = make_fake_model(tmp_path / "partial", partial)
    result = _generate(runner, "-o", str(out_dir / "a.png"), "--model", str(model))
    (line,) = _assert_one_error(result)
    assert "missing its" in line and "component" in line
    assert list(out_dir.iterdir()) == []
    assert fake_load == []


def test_steps_zero(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list) -> None:
    result = _generate(runner, "-o", str(out_dir / "a.png"), "--model", str(fake_model), "--steps", "0")
    (line,) = _assert_one_error(result)
    assert "--steps" in line
    assert list(out_dir.iterdir()) == []
    assert fake_load == []


def test_output_folder_missing(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list) -> None:
    result = _generate(runner, "-o", str(out_dir / "sub" / "a.png"), "--model", str(fake_model))
    (line,) = _assert_one_error(result)
    assert "does not exist" in line
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("where", ["read-only folder", "virtual filesystem"])
def test_output_folder_not_writable(
    runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list, where: str
) -> None:
    readonly = out_dir / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    target = readonly if where == "read-only folder" else Path("/sys")
    if os.geteuid() == 0 and target == readonly:
        target = Path("/proc")  # root ignores permission bits; nobody may create files in /proc
    try:
        result = _generate(runner, "-o", str(target / "a.png"), "--model", str(fake_model))
    finally:
        readonly.chmod(0o755)
    (line,) = _assert_one_error(result)
    assert "not writable" in line
    assert not (target / "a.png").exists()
    assert fake_load == []


def test_output_exists_without_overwrite(
    runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list
) -> None:
    existing = out_dir / "a.png"
    existing.write_bytes(b"keep me")
    result = _generate(runner, "-o", str(existing), "--model", str(fake_model))
    (line,) = _assert_one_error(result)
    assert "already exists" in line
    assert "--overwrite" in result.stderr  # the hint
    assert existing.read_bytes() == b"keep me"
    assert [p.name for p in out_dir.iterdir()] == ["a.png"]


def test_output_not_png(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list) -> None:
    result = _generate(runner, "-o", str(out_dir / "a.jpg"), "--model", str(fake_model))
    _assert_one_error(result)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--device", "gpu"],
        ["--device", "cuda:x"],
        ["--dtype", "float8"],
        ["--steps", "many"],
    ],
)
def test_usage_errors_exit_2(
    runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list, args
) -> None:
    result = _generate(runner, "-o", str(out_dir / "a.png"), "--model", str(fake_model), *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []


def test_missing_output_option_is_usage_error(runner: CliRunner, fake_model: Path) -> None:
    result = _generate(runner, "--model", str(fake_model))
    assert result.exit_code == 2


def test_no_model_given_is_usage_error(runner: CliRunner, out_dir: Path, fake_load: list) -> None:
    result = _generate(runner, "-o", str(out_dir / "a.png"))
    (line,) = _assert_one_error(result, code=2)
    assert line == "error: no model given"
    assert "hint:" in result.stderr and "QIMG_MODEL" in result.stderr
    assert list(out_dir.iterdir()) == []


def test_model_from_env(runner: CliRunner, fake_model: Path, out_dir: Path, fake_load: list) -> None:
    result = _generate(runner, "-o", str(out_dir / "a.png"), env={"QIMG_MODEL": str(fake_model)})
    assert result.exit_code == 0, result.output
    assert (out_dir / "a.png").is_file()


def _raise_from_load(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def load(*args, **kwargs):
        raise exc

    monkeypatch.setattr(qimg, "load", load)


def test_internal_error_is_one_line_with_hint(runner, monkeypatch, fake_model: Path, out_dir: Path) -> None:
    _raise_from_load(monkeypatch, RuntimeError("boom"))
    result = _generate(runner, "-o", str(out_dir / "a.png"), "--model", str(fake_model))
    (line,) = _assert_one_error(result)
    assert line == "error: internal error: RuntimeError: boom"
    assert "hint: rerun with --debug for the traceback and report it" in result.stderr
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("where", ["command", "root", "env"])
def test_debug_prints_traceback(runner, monkeypatch, fake_model: Path, out_dir: Path, where: str) -> None:
    _raise_from_load(monkeypatch, RuntimeError("boom"))
    args = ["generate", "a red fox", "-o", str(out_dir / "a.png"), "--model", str(fake_model)]
    env = None
    if where == "command":
        args.append("--debug")
    elif where == "root":
        args.insert(0, "--debug")
    else:
        env = {"QIMG_DEBUG": "1"}
    result = runner.invoke(app, args, prog_name="qimg", env=env)
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "raise exc" in result.stderr  # the frame that raised
    assert "error: internal error: RuntimeError: boom" in result.stderr


def test_qimg_error_from_load_exits_1(runner, monkeypatch, fake_model: Path, out_dir: Path) -> None:
    _raise_from_load(monkeypatch, qimg.QimgError("no CUDA GPU is visible", hint="use --device cpu"))
    result = _generate(runner, "-o", str(out_dir / "a.png"), "--model", str(fake_model))
    (line,) = _assert_one_error(result)
    assert line == "error: no CUDA GPU is visible"
    assert result.stderr.splitlines()[-1] == "hint: use --device cpu"


def test_keyboard_interrupt_exits_130(runner, monkeypatch, fake_model: Path, out_dir: Path) -> None:
    _raise_from_load(monkeypatch, KeyboardInterrupt())
    result = _generate(runner, "-o", str(out_dir / "a.png"), "--model", str(fake_model))
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == "interrupted"
    assert "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []


def test_console_script_exit_codes(tmp_path: Path) -> None:
    """The real entry point, not just the in-process runner: 1 for a qimg error, 2 for usage."""
    env = {k: v for k, v in os.environ.items() if k not in ("QIMG_MODEL", "QIMG_DEBUG")}
    base = [sys.executable, "-m", "qimg", "generate", "a fox", "-o", str(tmp_path / "a.png")]
    done = subprocess.run(
        [*base, "--model", str(tmp_path / "none")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: model folder") and "Traceback" not in done.stderr
    done = subprocess.run([*base, "--device", "tpu"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2


@pytest.mark.parametrize(
    "args",
    [
        ["a fox", "--strength", "0.5"],
        ["a fox", "--mask", "m.png"],
        [],  # neither PROMPT nor --prompt-embeds
        ["a fox", "--prompt-embeds", "e.safetensors"],
        ["--prompt-embeds", "e.safetensors", "--negative", "ugly"],
    ],
    ids=["strength-without-init", "mask-without-init", "no-prompt", "prompt-and-embeds", "negative-with-embeds"],
)
def test_conflicting_inputs_are_usage_errors(runner, fake_model: Path, out_dir: Path, fake_load: list, args) -> None:
    result = runner.invoke(app, ["generate", *args, "-o", str(out_dir / "a.png"), "--model", str(fake_model)],
                           prog_name="qimg")
    _assert_one_error(result, code=2)
    assert list(out_dir.iterdir()) == [] and fake_load == []


@pytest.mark.parametrize("content", [None, b"not an image"], ids=["missing", "garbage"])
def test_unreadable_init_image(runner, fake_model: Path, out_dir: Path, tmp_path: Path, fake_load: list, content):
    init = tmp_path / "init.png"
    if content is not None:
        init.write_bytes(content)
    result = _generate(runner, "-o", str(out_dir / "a.png"), "--model", str(fake_model), "--init-image", str(init))
    (line,) = _assert_one_error(result)
    assert "init image" in line
    assert list(out_dir.iterdir()) == [] and fake_load == []


def test_bad_strength_is_an_input_error(runner, fake_model: Path, out_dir: Path, tmp_path: Path, fake_load: list):
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32)).save(init)
    result = _generate(runner, "-o", str(out_dir / "a.png"), "--model", str(fake_model), "--init-image", str(init),
                       "--strength", "1.5")
    (line,) = _assert_one_error(result)
    assert "--strength" in line and fake_load == []


def test_cuda_out_of_memory_is_one_line_with_what_to_try(runner, monkeypatch, fake_model: Path, out_dir: Path):
    # The real class lives in torch; a stand-in with its name and module is what report() recognises.
    oom = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch.cuda"})

    def load(*args, **kwargs):
        raise oom("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(qimg, "load", load)
    result = _generate(runner, "-o", str(out_dir / "a.png"), "--model", str(fake_model))
    (line,) = _assert_one_error(result)
    assert line == "error: the GPU ran out of memory"
    assert "--tiled-vae" in result.stderr and "--fp8 weights" in result.stderr
    assert list(out_dir.iterdir()) == []


def _leave(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = "import sys, threading, time\nfrom qimg.cli.main import leave\n" + body
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def test_leaving_keeps_the_exit_code_and_every_byte_of_output(tmp_path: Path) -> None:
    done = _leave("import atexit\natexit.register(lambda: print('handler', file=sys.stderr))\n"
                  "print('x' * 200000, end='')\nleave(3)", tmp_path)
    assert done.returncode == 3
    assert done.stdout == "x" * 200000  # buffered output is flushed before the process ends
    assert done.stderr.strip() == "handler"  # atexit handlers still run
    message = _leave("leave('what went wrong')", tmp_path)
    assert (message.returncode, message.stderr.strip()) == (1, "what went wrong")  # SystemExit's meaning
    assert _leave("leave(None)", tmp_path).returncode == 0


def test_leaving_waits_for_a_thread_still_at_work(tmp_path: Path) -> None:
    # a non-daemon thread (a hash, a save) finishes before the process ends, as with a normal exit
    done = _leave("def work():\n    time.sleep(1)\n    open('done.txt', 'w').write('ok')\n"
                  "threading.Thread(target=work).start()\nleave(0)", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "done.txt").read_text() == "ok"


def test_leaving_does_not_wait_for_the_compile_workers_yet_ends_them(tmp_path: Path) -> None:
    """torch.compile's worker pool (a process of its own, with workers) is told to shut down at exit and ends on
    its own after qimg has gone: exit 0, nothing on stderr, and no process left behind."""
    import time

    done = _leave("import torch._inductor.config as config\nconfig.compile_threads = 2\n"
                  "from torch._inductor.async_compile import AsyncCompile, _pool_set\n"
                  "AsyncCompile.warm_pool()\nAsyncCompile.wakeup()\n"
                  "print(*[p.process.pid for p in _pool_set])\nleave(0)", tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert pids, "no compile worker pool was started"
    for _ in range(300):
        if not any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in pids):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"compile worker processes {pids} outlived qimg by 30 s")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    except (OSError, IndexError):
        return "zombie"
