"""The CLI says when a prompt is longer than the text encoder reads (generate, --prompts, encode-prompt), and
takes --max-sequence-length on generate; on the real tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.loading.components import load_tokenizer

LONG = " ".join(["a red fox"] * 400)  # 1200 tokens: past both 512 and 1024
RUN = ["--device", "cpu", "--steps", "1", "--width", "32", "--height", "32", "--cfg", "1"]


@pytest.fixture(scope="module")
def long_tokens(tiny_qwen: Path) -> int:
    return len(load_tokenizer(tiny_qwen / "tokenizer")(LONG).input_ids)


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def test_generate_warns_about_dropped_prompt_tokens(tiny_qwen: Path, tmp_path: Path, long_tokens: int, one_thread):
    result = CliRunner().invoke(app, ["generate", LONG, "--model", str(tiny_qwen), *RUN, "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    assert _warnings(result.stderr) == [
        f"warning: the prompt is {long_tokens} tokens; the last {long_tokens - 512} were dropped (the model reads "
        "512; --max-sequence-length up to 1024 keeps more)"
    ]
    assert qimg.read_params(tmp_path / "a.png")["prompt_tokens_dropped"] == long_tokens - 512


def test_generate_takes_max_sequence_length(tiny_qwen: Path, tmp_path: Path, long_tokens: int, one_thread):
    out = tmp_path / "b.png"
    result = CliRunner().invoke(app, ["generate", LONG, "--model", str(tiny_qwen), *RUN, "--max-sequence-length",
                                      "1024", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert _warnings(result.stderr) == [
        f"warning: the prompt is {long_tokens} tokens; the last {long_tokens - 1024} were dropped (the model reads "
        "1024)"
    ]
    params = qimg.read_params(out)
    assert params["max_sequence_length"] == 1024 and params["prompt_tokens_dropped"] == long_tokens - 1024
    bad = CliRunner().invoke(app, ["generate", "a fox", "--model", str(tiny_qwen), *RUN, "--max-sequence-length",
                                   "2000", "-o", str(tmp_path / "c.png")])
    assert bad.exit_code == 1 and "between 1 and 1024 (got 2000)" in bad.stderr and not (tmp_path / "c.png").exists()


def test_a_short_prompt_gives_no_warning(tiny_qwen: Path, tmp_path: Path, one_thread):
    result = CliRunner().invoke(app, ["generate", "a red fox", "--model", str(tiny_qwen), *RUN, "-o",
                                      str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    assert _warnings(result.stderr) == []


def test_quiet_hides_the_warning(tiny_qwen: Path, tmp_path: Path, one_thread):
    result = CliRunner().invoke(app, ["generate", LONG, "--model", str(tiny_qwen), *RUN, "--quiet", "-o",
                                      str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_a_prompt_file_warns_per_line(tiny_qwen: Path, tmp_path: Path, long_tokens: int, one_thread):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red fox\n{LONG}\n")
    result = CliRunner().invoke(app, ["generate", "--prompts", str(prompts), "--model", str(tiny_qwen), *RUN,
                                      "--max-sequence-length", "1000", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert _warnings(result.stderr) == [
        f"warning: {prompts}:2: the prompt is {long_tokens} tokens; the last {long_tokens - 1000} were dropped "
        "(the model reads 1000; --max-sequence-length up to 1024 keeps more)"
    ]


def test_encode_prompt_warns(tiny_qwen: Path, tmp_path: Path, long_tokens: int, one_thread):
    out = tmp_path / "long.safetensors"
    result = CliRunner().invoke(app, ["encode-prompt", LONG, "--model", str(tiny_qwen), "--device", "cpu", "-o",
                                      str(out)])
    assert result.exit_code == 0, result.output
    assert _warnings(result.stderr) == [
        f"warning: the prompt is {long_tokens} tokens; the last {long_tokens - 512} were dropped (the model reads "
        "512; --max-sequence-length up to 1024 keeps more)"
    ]
    assert qimg.load_embeddings(out).meta["dropped_tokens"] == {"prompt": long_tokens - 512}
