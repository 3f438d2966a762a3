"""What every family's prompt encoder shares: the text encoder(s) loaded on first use, placed as the memory plan
says (joining the run's residency when they visit the GPU only to encode), freed on request, and the check of
how many input images the model takes. A family's encoder subclasses TextEncoderSlot and supplies `_load`."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qimg.loading.hub import ModelRef
from qimg.pipelines.family import Family
from qimg.request import check_images
from qimg.runtime.offload import Offloaded, Residency
from qimg.runtime.planner import MemoryPlan


@dataclass
class TextEncoderSlot:
    """A model's text side, loaded on first use."""

    ref: ModelRef
    family: Family
    torch_device: torch.device
    torch_dtype: torch.dtype
    fp8: str | None = None  # FP8 storage for the linears family.text_encoder_fp8 selects
    plan: MemoryPlan | None = None  # where the encoder runs and whether it visits the GPU only to encode
    residency: Residency | None = None
    _model: Any = None

    def _load(self) -> tuple[Any, Offloaded | None]:
        """The family's encoder(s), placed as self.plan says, and their Offloaded when they visit the GPU."""
        raise NotImplementedError

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model, offloaded = self._load()
            if offloaded is not None and self.residency is not None:
                self.residency.add("text_encoder", offloaded)
        return self._model

    def release(self) -> None:
        """Free the text encoder(s) (a later prompt loads them again)."""
        if self._model is None:
            return
        if self.residency is not None:
            self.residency.drop("text_encoder")
        self._model = None
        gc.collect()
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model_if_loaded(self) -> Any:
        """The text encoder(s) if loaded, else None (for error reports that must not load them)."""
        return self._model

    def check_images(self, images: Sequence[Any]) -> None:
        check_images(self.ref.spec, self.ref.name, len(images))
