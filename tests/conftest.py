"""Shared fixtures: an isolated environment (no network, no user caches) and tiny models in the official layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import build_qwen_tokenizer, write_tiny_qwen_image
from tests.fixtures_edit import EDIT_VARIANTS, write_tiny_qwen_image_edit


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Tests never touch the network or the user's caches."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf" / "hub"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "modelscope"))
    monkeypatch.setenv("QIMG_HOME", str(home / "qimg"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(home / "modelscope-home"))  # modelscope writes credentials there
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("QIMG_MODEL", raising=False)
    monkeypatch.delenv("QIMG_DEBUG", raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convs on a busy 2-core machine: one thread avoids OpenMP spin-waits (several times faster). Module
    scope, so references that module fixtures compute use the same thread count (and summation order) as tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_tokenizer")
    build_qwen_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen_pipe_and_dir(tmp_path_factory, qwen_tokenizer_dir):
    """(diffusers QwenImagePipeline, folder) for a tiny random Qwen-Image with a sharded transformer."""
    root = tmp_path_factory.mktemp("tiny-qwen-image")
    pipe = write_tiny_qwen_image(root, qwen_tokenizer_dir, transformer_shard_size="300KB")
    return pipe, root


@pytest.fixture(scope="session")
def tiny_qwen(tiny_qwen_pipe_and_dir):
    """Path to a tiny random Qwen-Image model folder in the official diffusers layout."""
    return tiny_qwen_pipe_and_dir[1]


@pytest.fixture(scope="session")
def tiny_edit_model(tmp_path_factory, qwen_tokenizer_dir) -> Callable[[str], tuple[Any, Path]]:
    """variant ("edit", "edit-2509", "edit-2511") -> (diffusers pipeline, model folder), each written once."""
    made: dict[str, tuple[Any, Path]] = {}

    def get(variant: str) -> tuple[Any, Path]:
        if variant not in EDIT_VARIANTS:
            raise KeyError(f"unknown edit variant {variant}; known: {', '.join(EDIT_VARIANTS)}")
        if variant not in made:
            root = tmp_path_factory.mktemp(f"tiny-qwen-image-{variant}")
            made[variant] = (write_tiny_qwen_image_edit(root, qwen_tokenizer_dir, variant), root)
        return made[variant]

    return get


@pytest.fixture(scope="session")
def tiny_qwen_edit_pipe_and_dir(tiny_edit_model):
    """(diffusers QwenImageEditPipeline, folder) for a tiny random Qwen-Image-Edit."""
    return tiny_edit_model("edit")


@pytest.fixture(scope="session")
def tiny_qwen_edit_2509_pipe_and_dir(tiny_edit_model):
    """(diffusers QwenImageEditPlusPipeline, folder) for a tiny random Qwen-Image-Edit-2509."""
    return tiny_edit_model("edit-2509")


@pytest.fixture(scope="session")
def tiny_qwen_edit_2511_pipe_and_dir(tiny_edit_model):
    """(diffusers QwenImageEditPlusPipeline, folder) for a tiny random Qwen-Image-Edit-2511 (zero_cond_t)."""
    return tiny_edit_model("edit-2511")
