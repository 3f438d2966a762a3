"""RuntimeOptions: one frozen object, every bound checked in one place, the same for the CLI and the library."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.runtime.options import MIN_VRAM_BUDGET, RuntimeOptions


@pytest.mark.parametrize("bad", [
    {"vram_budget": 0.0}, {"vram_budget": MIN_VRAM_BUDGET / 2}, {"vram_budget": float("nan")},
    {"offload": "disk"}, {"fp8": "int8"}, {"attention": "fastest"}, {"text_encoder_device": "tpu"},
    {"dtype": "float64"}, {"device": "gpu0"}, {"vae_tiling": 512},
])  # fmt: skip
def test_each_bound_is_a_usage_error(bad):
    with pytest.raises(qimg.UsageError):
        RuntimeOptions(**bad)


def test_options_are_frozen_and_replace_checks_again():
    options = RuntimeOptions(vram_budget=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.fp8 = "weights"  # type: ignore[misc]
    assert options.replace(fp8="weights").fp8 == "weights" and options.fp8 is None
    assert options.budget_bytes == 8 * 1024**3
    with pytest.raises(qimg.UsageError):
        options.replace(vram_budget=0.1)


def test_the_cli_and_the_library_share_the_bound(tmp_path, tiny_qwen):
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(tiny_qwen), "--device", "cpu",
                                      "--vram-budget", "0.25", "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 2 and f">= {MIN_VRAM_BUDGET}" in result.output
    assert not (tmp_path / "a.png").exists()
