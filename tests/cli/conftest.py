"""Fixtures for CLI tests: a clean environment, fake model folders, and a fake pipeline behind qimg.load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import qimg
from qimg.loading.hub import QWEN_IMAGE_COMPONENTS


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's shell must not change what the CLI does under test (default model, debug, colour)."""
    for name in ("QIMG_MODEL", "QIMG_DEBUG", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def make_fake_model(root: Path, components: dict[str, str] = QWEN_IMAGE_COMPONENTS) -> Path:
    """A folder that passes qimg.resolve_model (model_index.json + component markers) but holds no weights."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    for component, marker in components.items():
        (root / component).mkdir(exist_ok=True)
        (root / component / marker).write_text("{}")
    return root


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    return make_fake_model(tmp_path / "model")


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An empty folder for outputs, separate from the model, so "no file left behind" is a listdir."""
    path = tmp_path / "out"
    path.mkdir()
    return path


class FakePipeline:
    """Stands in for a loaded pipeline: runs the progress callback and returns a small flat image."""

    def __init__(self, model: Any, device: str | None, dtype: str | None) -> None:
        self.model = model
        self.device = device or "cpu"
        self.dtype = dtype or "float32"
        self.requests: list[qimg.GenerateRequest] = []

    def generate(self, *, request: qimg.GenerateRequest, progress: Any = None, **inputs: Any) -> list[Any]:
        from PIL import Image

        self.requests.append(request)
        self.inputs = inputs  # init_image, mask, embeddings: whatever the command passed besides the request
        for i in range(request.steps):
            if progress is not None:
                progress(i + 1, request.steps)
        image = Image.new("RGB", (request.width, request.height), (request.seed % 256, 40, 80))
        image.info["qimg"] = {
            **request.as_dict(),
            "model": str(getattr(self.model, "name", self.model)),
            "dtype": self.dtype,
            "qimg_version": qimg.__version__,
        }
        return [image]

    def run(self, job: qimg.Job, progress: Any = None, **_: Any) -> list[Any]:
        images = self.generate(request=job.request, progress=progress, **job.inputs)
        images[0].info["qimg"].update(job.extra)
        return images


@pytest.fixture
def fake_load(monkeypatch: pytest.MonkeyPatch) -> list[FakePipeline]:
    """Replace qimg.load with one that returns FakePipelines; the list collects them for inspection."""
    made: list[FakePipeline] = []

    def load(model: Any, options: qimg.RuntimeOptions | None = None, *, shape: Any = None, loras: Any = (),
             **overrides: Any) -> Any:
        options = (options or qimg.RuntimeOptions()).replace(**overrides)
        made.append(FakePipeline(model, options.device, options.dtype))
        made[-1].loras = list(loras)  # what qimg.load was asked to merge or attach
        made[-1].options = options  # vae_tiling, attention, compile, fp8: the runtime features asked for
        made[-1].shape = shape
        made[-1].vae_tiling = options.vae_tiling
        return made[-1]

    monkeypatch.setattr(qimg, "load", load)
    return made
