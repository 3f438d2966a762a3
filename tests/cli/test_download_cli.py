"""qimg download and qimg models through the CLI: against the local hub (tests/loading/hub_server.py), then a real
tiny generate by alias; dry run, corruption, offline, quiet, ModelScope wiring, exit codes and one-line errors."""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.loading.hub import resolve_lora
from tests.loading import hub_server
from tests.loading.hub_server import EIGHT_STEPS, FOUR_STEPS, LIGHTNING, HubServer
from tests.loading.test_hub import VAE, closed_port_url, modelscope_logs, place, unreachable_modelscope

hf_hub, tiny_qwen_repo, lora_hub = hub_server.hf_hub, hub_server.tiny_qwen_repo, hub_server.lora_hub  # fixtures
modelscope_logs = modelscope_logs  # a fixture


def _run(runner: CliRunner, *argv: str):
    return runner.invoke(app, list(argv), prog_name="qimg")


def _one_error(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_download_then_generate_by_alias(runner: CliRunner, hf_hub: HubServer, tmp_path: Path) -> None:
    result = _run(runner, "download", "qwen-image")
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip())  # stdout holds the folder alone, for scripts
    assert path.name == hf_hub.repos["Qwen/Qwen-Image"].commit and (path / "model_index.json").is_file()
    assert "use it with: qimg generate PROMPT -o OUT.png --model qwen-image" in result.stderr
    assert f"fetched {VAE}" in result.stderr  # not a terminal: one line per file instead of bars

    out = tmp_path / "fox.png"
    gen = _run(runner, "generate", "a red fox", "-o", str(out), "--model", "qwen-image", "--steps", "1",
               "--width", "32", "--height", "32", "--seed", "1", "--device", "cpu")
    assert gen.exit_code == 0, gen.output
    assert qimg.read_params(out)["model"] == "qwen-image"  # the name as typed, not the cache path


def test_dry_run_prints_files_and_total_and_writes_nothing(runner: CliRunner, hf_hub: HubServer) -> None:
    result = _run(runner, "download", "qwen-image", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Qwen/Qwen-Image on hf (main, commit ")
    assert any(line.split()[-1] == VAE and line.split()[1] == "MB" for line in lines)  # "  10.3 MB  vae/..."
    total = sum(len(data) for p, data in hf_hub.repos["Qwen/Qwen-Image"].files.items() if p in result.stdout)
    assert lines[-1] == f"total: 13 files, {total / 1e6:.1f} MB; to fetch: 13 files, {total / 1e6:.1f} MB"
    assert "README.md" not in result.stdout and ".bin" not in result.stdout
    assert not any(Path(os.environ["HF_HOME"]).rglob("*"))


def test_quiet_prints_only_the_folder(runner: CliRunner, hf_hub: HubServer) -> None:
    hf_hub.cut_once.add(VAE)  # huggingface_hub logs a warning when it resumes: --quiet hides it
    result = _run(runner, "download", "qwen-image", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and Path(result.stdout.strip()).is_dir()


def test_corrupt_file_is_one_error_and_exit_1(runner: CliRunner, hf_hub: HubServer) -> None:
    hf_hub.corrupt.add(VAE)
    line = _one_error(_run(runner, "download", "qwen-image"))
    assert f"{VAE} from Qwen/Qwen-Image is corrupt (sha256" in line and "the file was removed" in line


def test_a_gated_repo_without_a_token_says_what_to_do(runner: CliRunner, hf_hub: HubServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """FLUX.1-dev's repo is gated: without a token the hub answers 401 GatedRepo."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hf_hub.gated.add("Qwen/Qwen-Image")
    result = _run(runner, "download", "qwen-image")
    line = _one_error(result)  # exit 1, one line, no traceback
    assert "Qwen/Qwen-Image on " in line and "is gated or disabled" in line
    assert "accept its license on the model page and set HF_TOKEN" in result.stderr


def test_offline_download_and_generate_name_the_command(runner: CliRunner, tmp_path: Path) -> None:
    # HF_HUB_OFFLINE=1 is the suite's default, and the caches are empty.
    line = _one_error(_run(runner, "download", "qwen-image"))
    assert "HF_HUB_OFFLINE is set" in line
    result = _run(runner, "generate", "a fox", "-o", str(tmp_path / "a.png"), "--model", "qwen-image")
    line = _one_error(result)
    assert "qwen-image is not downloaded" in line
    hints = [h for h in result.stderr.splitlines() if "qimg download" in h]
    assert hints == ["hint: run: qimg download qwen-image"]
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_exit_2(runner: CliRunner) -> None:
    assert _run(runner, "download", "qwen-image", "--source", "civitai").exit_code == 2
    _one_error(_run(runner, "download", "not a name"), code=2)


def test_models_lists_aliases_and_local_copies(runner: CliRunner, tiny_qwen: Path) -> None:
    place(tiny_qwen, Path(os.environ["MODELSCOPE_CACHE"]) / "models" / "Qwen--Qwen-Image-Edit" / "snapshots" / "m")
    (Path(os.environ["MODELSCOPE_CACHE"]) / "models" / "Qwen--Qwen-Image-Edit" / "snapshots" / "m" / VAE).unlink()
    text = _run(runner, "models")
    assert text.exit_code == 0, text.output
    assert "qwen-image-2512       text-to-image  Qwen/Qwen-Image-2512 (hf, modelscope)" in text.stdout
    assert "    not downloaded: qimg download qwen-image-2512" in text.stdout
    result = _run(runner, "models", "--json")
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert set(entries) == {"qwen-image", "qwen-image-2512", "qwen-image-edit", "qwen-image-edit-2509",
                            "qwen-image-edit-2511", "flux-dev", "flux-kontext-dev"}
    (copy,) = entries["qwen-image-edit"]["local"]
    assert (copy["source"], copy["complete"], copy["missing"]) == ("modelscope", False, [VAE])
    assert copy["size_bytes"] > 0 and entries["qwen-image"]["local"] == []


def test_modelscope_source_wiring(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                  tiny_qwen: Path) -> None:
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))
    ms_api = importlib.import_module("modelscope.hub.api")
    ms_snapshot = importlib.import_module("modelscope.hub.snapshot_download")
    files = [{"Path": p.relative_to(tiny_qwen).as_posix(), "Size": p.stat().st_size}
             for p in tiny_qwen.rglob("*") if p.is_file()]
    seen: dict = {}

    def fake_snapshot(repo_id: str, **kwargs) -> str:
        seen.update(kwargs, repo_id=repo_id)
        return str(place(tiny_qwen, Path(kwargs["local_dir"])))

    monkeypatch.setattr(ms_api.HubApi, "get_model_files", lambda self, model_id, **kw: files)
    monkeypatch.setattr(ms_snapshot, "snapshot_download", fake_snapshot)
    monkeypatch.setattr("qimg.loading.download_modelscope._check_reachable", lambda endpoint, hint: None)  # no dial
    dry = _run(runner, "download", "qwen-image-2512", "--source", "modelscope", "--dry-run")
    assert dry.exit_code == 0 and dry.stdout.startswith("Qwen/Qwen-Image-2512 on modelscope (master)")
    assert seen == {}
    result = _run(runner, "download", "qwen-image-2512", "--source", "modelscope", "--revision", "v1",
                  "--local-dir", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    assert (seen["repo_id"], seen["revision"], seen["local_dir"]) == ("Qwen/Qwen-Image-2512", "v1", str(tmp_path / "m"))
    assert "model_index.json" in seen["allow_patterns"]
    assert result.stdout.strip() == str(tmp_path / "m")
    assert f"--model {tmp_path / 'm'}" in result.stderr


def test_an_unreachable_hub_with_the_model_on_disk_is_a_download(runner: CliRunner, hf_hub: HubServer,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = _run(runner, "download", "qwen-image", "--quiet")
    assert first.exit_code == 0, first.output
    path = first.stdout.strip()
    monkeypatch.setenv("HF_ENDPOINT", url := closed_port_url())  # no network: the hub refuses every connection
    quiet = _run(runner, "download", "qwen-image", "--quiet")  # MODEL_DIR=$(qimg download qwen-image --quiet)
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == f"{path}\n" and quiet.stderr == ""
    loud = _run(runner, "download", "qwen-image")
    assert loud.exit_code == 0, loud.output
    assert loud.stdout == f"{path}\n"
    notes = [line for line in loud.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(f"note: cannot reach {url} (")
    assert notes[0].endswith(": the complete copy on disk is used as it is, without checking for updates")
    (Path(path) / VAE).unlink()  # an incomplete copy: the error it was
    line = _one_error(_run(runner, "download", "qwen-image", "--quiet"))
    assert line.startswith(f"error: cannot reach {url} (")


def test_modelscope_unreachable_is_one_fast_line(runner: CliRunner, monkeypatch: pytest.MonkeyPatch,
                                                  tiny_qwen: Path, modelscope_logs: list) -> None:
    url = unreachable_modelscope(monkeypatch)
    started = time.monotonic()
    result = _run(runner, "download", "qwen-image", "--source", "modelscope")
    assert time.monotonic() - started < 3  # modelscope alone retries for ~9 s, logging each try
    assert _one_error(result) == f"error: cannot reach {url} (Connection refused)"
    assert "WARNING" not in result.output and not [r for r in modelscope_logs if r.levelname == "WARNING"]
    folder = place(tiny_qwen, Path(os.environ["MODELSCOPE_CACHE"]) / "models" / "Qwen--Qwen-Image" / "snapshots"
                   / "master")
    quiet = _run(runner, "download", "qwen-image", "--source", "modelscope", "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == f"{folder}\n" and quiet.stderr == ""


def test_help_has_examples(runner: CliRunner) -> None:
    for command in ("download", "models"):
        result = _run(runner, command, "--help")
        assert result.exit_code == 0 and f"qimg {command}" in result.stdout.split("Examples:")[1]


# --- LoRA files ------------------------------------------------------------------------------------------------


def test_download_a_lora_file_prints_its_lora_name(runner: CliRunner, lora_hub: HubServer) -> None:
    result = _run(runner, "download", LIGHTNING, "--file", "*8steps*")
    assert result.exit_code == 0, result.output
    name = f"{LIGHTNING}/{EIGHT_STEPS}"
    assert result.stdout == f"{name}\n"  # stdout holds the --lora name alone: LORA=$(qimg download ... -q)
    assert f"{LIGHTNING} on hf (main, commit " in result.stderr and ": 1 file, 3.0 kB" in result.stderr
    assert f"fetched {EIGHT_STEPS} (3.0 kB)" in result.stderr
    assert f"use it with: qimg generate PROMPT -o OUT.png --model MODEL --lora {name}" in result.stderr
    path = resolve_lora(name)
    assert path.read_bytes() == lora_hub.repos[LIGHTNING].files[EIGHT_STEPS]
    assert f"ready: {name} ({path})" in result.stderr
    quiet = _run(runner, "download", LIGHTNING, "--file", EIGHT_STEPS, "--file", FOUR_STEPS, "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout.splitlines() == [f"{LIGHTNING}/{FOUR_STEPS}", name] and quiet.stderr == ""


def test_lora_dry_run_and_errors(runner: CliRunner, lora_hub: HubServer) -> None:
    dry = _run(runner, "download", LIGHTNING, "--file", "*.safetensors", "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.stdout.splitlines()
    assert lines[0].startswith(f"{LIGHTNING} on hf (main, commit ")
    assert lines[0].endswith(f"models--lightx2v--Qwen-Image-Lightning/snapshots/{lora_hub.repos[LIGHTNING].commit}")
    assert lines[-1] == "total: 3 files, 5.5 kB; to fetch: 3 files, 5.5 kB"
    assert ".bin" not in dry.stdout and "README" not in dry.stdout
    line = _one_error(_run(runner, "download", LIGHTNING, "--file", "*16steps*"))  # no match: exit 1
    assert line == f"error: {LIGHTNING} on Hugging Face has no .safetensors file matching '*16steps*'"
    line = _one_error(_run(runner, "download", LIGHTNING), code=2)  # several and no --file: pick one
    assert "holds 3 .safetensors files" in line and "pick with --file" in line
    assert not any(Path(os.environ["HF_HOME"]).rglob("*.safetensors"))
