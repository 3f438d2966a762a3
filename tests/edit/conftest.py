"""Session fixtures for the edit models: tiny random Edit / Edit-2509 / Edit-2511 folders and diffusers on them.

Kept apart from tests/conftest.py; that file's session fixtures (qwen_tokenizer_dir) are visible here too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_edit import EDIT_VARIANTS, write_tiny_qwen_image_edit


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
