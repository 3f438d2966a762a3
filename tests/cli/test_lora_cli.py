"""qimg lora inspect: what a LoRA file holds, read as --lora reads it, with nothing loaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from qimg.cli.main import app


def _kohya(path: Path, fan: int, modules: int = 2) -> Path:
    state = {}
    for i in range(modules):
        key = f"lora_unet_transformer_blocks_{i}_attn_to_q"
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = torch.zeros(4, fan), torch.zeros(fan, 4)
        state[f"{key}.alpha"] = torch.tensor(2.0)
    state["lora_te1_text_model_x.lora_down.weight"] = torch.zeros(2, 2)
    save_file(state, str(path), metadata={"ss_network_dim": "4"})
    return path


def test_inspect_against_the_released_architecture(tmp_path: Path):
    path = _kohya(tmp_path / "k.safetensors", 3072)
    result = CliRunner().invoke(app, ["lora", "inspect", str(path)], prog_name="qimg")
    assert result.exit_code == 0, result.output
    assert "dialect: kohya, for qwen-image" in result.stdout and "rank: 4; alpha: 2" in result.stdout
    assert "targets: attn.to_q x2" in result.stdout and "unmatched: 1 key(s)" in result.stdout
    info = json.loads(CliRunner().invoke(app, ["lora", "inspect", str(path), "--json"]).stdout)
    assert (info["modules"], info["ranks"], info["alphas"]) == (2, [4], [2.0])
    assert info["metadata"] == {"ss_network_dim": "4"}


def test_inspect_against_a_model_uses_its_config(tmp_path: Path, tiny_qwen: Path):
    full = _kohya(tmp_path / "full.safetensors", 3072)
    tiny = _kohya(tmp_path / "tiny.safetensors", 32)
    runner = CliRunner()
    assert runner.invoke(app, ["lora", "inspect", str(tiny), "--model", str(tiny_qwen)]).exit_code == 0
    wrong = runner.invoke(app, ["lora", "inspect", str(full), "--model", str(tiny_qwen)])
    assert wrong.exit_code == 1 and wrong.stderr.startswith("error: ") and "Traceback" not in wrong.output
    missing = runner.invoke(app, ["lora", "inspect", str(tmp_path / "none.safetensors")])
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
