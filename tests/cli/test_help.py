"""Help, version, import cost, and the generated completions/docs staying in sync with the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import qimg
from qimg.cli import gendocs
from qimg.cli.main import app

REPO = Path(__file__).resolve().parents[2]


def test_root_help_shows_commands_and_examples(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"], prog_name="qimg")
    assert result.exit_code == 0
    assert "generate" in result.stdout
    assert "Examples:" in result.stdout
    assert 'qimg generate "a lighthouse at dusk' in result.stdout
    for option in ("--version", "--debug", "--install-completion", "--show-completion"):
        assert option in result.stdout


def test_generate_help_shows_every_option_and_examples(runner: CliRunner) -> None:
    result = runner.invoke(app, ["generate", "--help"], prog_name="qimg")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout
    assert "qimg generate" in result.stdout.split("Examples:")[1]
    # Other tools and docs depend on these exact names.
    for option in (
        "--output", "--model", "--seed", "--steps", "--cfg", "--negative", "--width", "--height",
        "--device", "--dtype", "--quiet", "--overwrite", "--debug", "QIMG_MODEL",
    ):  # fmt: skip
        assert option in result.stdout, option


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"], prog_name="qimg")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"qimg {qimg.__version__}"


def test_help_does_not_import_torch() -> None:
    """`qimg --help` must stay fast: importing the CLI and rendering help may not pull in torch."""
    code = (
        "import sys\n"
        "from qimg.cli.main import app\n"
        "for args in (['--help'], ['generate', '--help']):\n"
        "    try:\n"
        "        app(args, prog_name='qimg')\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_python_dash_m_runs_the_same_app() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qimg", "--version"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"qimg {qimg.__version__}"


def test_generated_completions_and_docs_are_current() -> None:
    """CI fails when the CLI changes without `python -m qimg.cli.gendocs` being rerun."""
    for rel, expected in gendocs.generated_files().items():
        path = REPO / rel
        assert path.is_file(), f"{rel} is missing; run: python -m qimg.cli.gendocs"
        assert path.read_text(encoding="utf-8") == expected, (
            f"{rel} is stale; run: python -m qimg.cli.gendocs"
        )


def test_completion_scripts_name_the_program() -> None:
    for shell in gendocs.SHELLS:
        script = (REPO / "completions" / f"qimg.{shell}").read_text(encoding="utf-8")
        assert "_QIMG_COMPLETE=complete_" in script and "qimg" in script
