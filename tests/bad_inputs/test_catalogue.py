"""The bad-input catalogue (catalogue.py): each case's exit code, its one error line first, no traceback, and
no file created or changed; plus docs/errors.md kept current."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import qimg
from qimg.cli.main import app
from qimg.embeddings import EmbeddingsFile, PromptEmbeds, save_embeddings

from .catalogue import CASES, DOC, Case, markdown

# Lines a run prints before it fails (what it is about to do); the first other line must be the error.
PROGRESS = re.compile(r"seed: |CFG |loaded |warning: |note: |\d+ prompts? from ")


def _weights(model: Path) -> Path:
    return next((model / "transformer").glob("*.safetensors"))


def _rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming a size, then IEND: PIL reads the size without any pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _embeds(tmp: Path, family: str, template: str, value: float = 0.0) -> None:
    cond = PromptEmbeds(torch.full((1, 3, 32), value))
    meta = {"family": family, "template": template, "prompt": "a fox", "negative": None}
    save_embeddings(tmp / "e.safetensors", EmbeddingsFile(cond, None, meta))


def _lora(tmp: Path, key: str, fan_in: int, fan_out: int) -> None:
    """A kohya-style LoRA file with one module under `key` (rank 2)."""
    save_file({f"{key}.lora_down.weight": torch.zeros(2, fan_in), f"{key}.lora_up.weight": torch.zeros(fan_out, 2)},
              str(tmp / "l.safetensors"))


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _disk_full(fd: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _read_only(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


# name -> setup(case folder, its model copy, monkeypatch); a setup that damages {model} works on the copy.
def _train_data(tmp: Path, *, caption: bool) -> None:
    (tmp / "data").mkdir()
    Image.new("RGB", (256, 256), (200, 30, 30)).save(tmp / "data" / "a.png")
    if caption:
        (tmp / "data" / "a.txt").write_text("a red square", encoding="utf-8")


SETUPS: dict[str, Callable[[Path, Path, pytest.MonkeyPatch], None]] = {
    "remove_model_index": lambda tmp, m, mp: (m / "model_index.json").unlink(),
    "corrupt_model_index": lambda tmp, m, mp: (m / "model_index.json").write_text("{not json"),
    "foreign_pipeline": lambda tmp, m, mp: (m / "model_index.json").write_text('{"_class_name": "SD3Pipeline"}'),
    "remove_vae": lambda tmp, m, mp: shutil.rmtree(m / "vae"),
    "empty_weights": lambda tmp, m, mp: _weights(m).write_bytes(b""),
    "truncate_weights": lambda tmp, m, mp: _weights(m).write_bytes(_weights(m).read_bytes()[:1000]),
    "missing_shard": lambda tmp, m, mp: _split_into_missing_shard(m),
    "drop_tensor": lambda tmp, m, mp: _rewrite(_weights(m), lambda t: t.pop("norm_out.linear.weight")),
    "extra_tensor": lambda tmp, m, mp: _rewrite(_weights(m), lambda t: t.update(extra=torch.zeros(2))),
    "int32_weights": lambda tmp, m, mp: _rewrite(
        _weights(m), lambda t: t.update({"proj_out.weight": t["proj_out.weight"].to(torch.int32)})),
    "nan_weights": lambda tmp, m, mp: _rewrite(
        _weights(m), lambda t: t["proj_out.weight"].fill_(float("nan"))),
    "config_without_layers": lambda tmp, m, mp: _edit_json(m / "transformer" / "config.json", "num_layers"),
    "corrupt_config": lambda tmp, m, mp: (m / "transformer" / "config.json").write_text("{"),
    "corrupt_tokenizer": lambda tmp, m, mp: (m / "tokenizer" / "tokenizer.json").write_text('{"version": '),
    "pickled_text_encoder": lambda tmp, m, mp: _pickled_text_encoder(m),
    "input_image": lambda tmp, m, mp: Image.new("RGB", (40, 32), (200, 30, 30)).save(tmp / "in.png"),
    "train_data": lambda tmp, m, mp: _train_data(tmp, caption=True),
    "train_no_caption": lambda tmp, m, mp: _train_data(tmp, caption=False),
    "existing_output": lambda tmp, m, mp: (tmp / "out.png").write_bytes(b"an earlier image"),
    "png_folder": lambda tmp, m, mp: (tmp / "dir.png").mkdir(),
    "read_only_folder": lambda tmp, m, mp: mp.setattr("tempfile.mkstemp", _read_only),
    "disk_full": lambda tmp, m, mp: mp.setattr("qimg.png.os.fsync", _disk_full),
    "bad_jsonl": lambda tmp, m, mp: (tmp / "p.jsonl").write_text('{"prompt": "a"}\n{not json\n'),
    "bad_seed_jsonl": lambda tmp, m, mp: (tmp / "seed.jsonl").write_text('{"prompt": "a", "seed": -1}\n'),
    "prompts_txt": lambda tmp, m, mp: (tmp / "p.txt").write_text("a red fox\na blue bird\n"),
    "text_as_embeds": lambda tmp, m, mp: (tmp / "e.safetensors").write_text("hello"),
    "flux_embeds": lambda tmp, m, mp: _embeds(tmp, "flux", "flux-t5"),
    "nan_embeds": lambda tmp, m, mp: _embeds(tmp, "qwen-image", "qwen-image-t2i", float("nan")),
    "qwen_embeds": lambda tmp, m, mp: _embeds(tmp, "qwen-image", "qwen-image-t2i"),
    "text_as_image": lambda tmp, m, mp: (tmp / "note.png").write_text("not a picture"),
    "truncated_image": lambda tmp, m, mp: _truncated_png(tmp / "cut.png"),
    "bomb_image": lambda tmp, m, mp: (tmp / "bomb.png").write_bytes(_png_header(20000, 20000)),
    "pickle_lora": lambda tmp, m, mp: (tmp / "style.ckpt").write_bytes(b"a pickle qimg must never open"),
    "text_lora": lambda tmp, m, mp: (tmp / "l.safetensors").write_text("not a LoRA"),
    "unmatched_lora": lambda tmp, m, mp: _lora(tmp, "lora_unet_nothing_here", 2, 2),
    "flux_lora": lambda tmp, m, mp: _lora(tmp, "lora_unet_double_blocks_0_img_attn_qkv", 32, 96),
    "misshapen_lora": lambda tmp, m, mp: _lora(tmp, "lora_unet_transformer_blocks_0_attn_to_q", 7, 5),
    "tucker_lora": lambda tmp, m, mp: save_file({f"lycoris_transformer_blocks_0_attn_to_q.{k}": torch.zeros(2, 2, 3, 3)
                                                 for k in ("hada_t1", "hada_t2")}, str(tmp / "l.safetensors")),
    "interrupt": lambda tmp, m, mp: mp.setattr(qimg, "load", _interrupt),
    "interrupt_batch": lambda tmp, m, mp: (SETUPS["prompts_txt"](tmp, m, mp), mp.setattr(qimg, "load", _interrupt)),
}
DAMAGES_MODEL = {"remove_model_index", "corrupt_model_index", "foreign_pipeline", "remove_vae", "empty_weights",
                 "truncate_weights", "missing_shard", "drop_tensor", "extra_tensor", "int32_weights", "nan_weights",
                 "config_without_layers", "corrupt_config", "corrupt_tokenizer", "pickled_text_encoder"}


def _edit_json(path: Path, drop: str) -> None:
    config = json.loads(path.read_text())
    config.pop(drop)
    path.write_text(json.dumps(config))


def _split_into_missing_shard(model: Path) -> None:
    weights = _weights(model)
    names = list(load_file(weights))
    shards = tuple(f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2))
    weights.rename(weights.parent / shards[0])
    index = {"metadata": {}, "weight_map": {n: shards[i % 2] for i, n in enumerate(names)}}
    (weights.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def _pickled_text_encoder(model: Path) -> None:
    for path in (model / "text_encoder").glob("model*.safetensors*"):
        path.unlink()
    (model / "text_encoder" / "pytorch_model.bin").write_bytes(b"a pickle qimg must never open")


def _truncated_png(path: Path) -> None:
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    path.write_bytes(path.read_bytes()[:60])


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots, with a hash of its bytes (sizes alone miss a rewrite of the same length)."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                files[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_qwen: Path, tiny_qwen_edit_pipe_and_dir) -> tuple[Path, Path]:
    """Read-only copies of the tiny models for the cases that do not damage one (each case checks them)."""
    root = tmp_path_factory.mktemp("catalogue-models")
    shutil.copytree(tiny_qwen, root / "qwen")
    shutil.copytree(tiny_qwen_edit_pipe_and_dir[1], root / "edit")
    return root / "qwen", root / "edit"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   one_thread) -> None:
    model, edit = models
    work = tmp_path / "case"
    work.mkdir()
    if case.setup in DAMAGES_MODEL:
        model = Path(shutil.copytree(model, tmp_path / "model"))
    if case.setup:
        SETUPS[case.setup](work, model, monkeypatch)
    monkeypatch.chdir(work)
    values = {"model": str(model), "edit": str(edit), "out": str(work / "out.png"), "tmp": str(work)}
    argv = [a.format(**values) for a in case.argv]
    before = _snapshot(work, model, edit)

    result = CliRunner().invoke(app, argv, prog_name="qimg")

    assert result.exit_code == case.code, (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    first = next((line for line in lines if not PROGRESS.match(line)), "")
    expected_prefix = "interrupted" if case.code == 130 else "error: "
    assert first.startswith(expected_prefix) and case.first in first, result.stderr
    assert sum(line.startswith("error:") for line in lines) <= 1, result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert _snapshot(work, model, edit) == before, "a file was created or changed"


def test_the_catalogue_is_large_and_its_ids_unique():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert all(c.setup in SETUPS for c in CASES if c.setup)


def test_errors_md_is_current():
    assert DOC.read_text() == markdown(), "regenerate it: python -m tests.bad_inputs.catalogue"
