"""What every family's prompt encoder shares: the text encoder(s) loaded on first use, placed as the memory plan
says (joining the run's residency when they visit the GPU only to encode), freed on request, and the check of
how many input images the model takes. A family's encoder subclasses TextEncoderSlot and supplies `_load`."""

from __future__ import annotations

import abc
import contextlib
import gc
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from qimg.loading.hub import ModelRef
from qimg.loading.reader import quick_thread_handoff
from qimg.pipelines.family import Family
from qimg.request import check_images
from qimg.runtime.offload import Offloaded, Residency
from qimg.runtime.planner import MemoryPlan


@dataclass
class TextEncoderSlot(abc.ABC):
    """A model's text side, loaded on first use."""

    ref: ModelRef
    family: Family
    torch_device: torch.device
    torch_dtype: torch.dtype
    fp8: str | None = None  # FP8 storage for the linears family.text_encoder_fp8 selects
    plan: MemoryPlan | None = None  # where the encoder runs and whether it visits the GPU only to encode
    residency: Residency | None = None
    _model: Any = None
    _pending: Future[tuple[Any, Offloaded | None]] | None = None
    _loader: threading.Thread | None = None  # the worker of load_in_background

    def load_in_background(self) -> None:
        """Start loading on a worker thread, the tokenizers first, so reading them and the text encoder overlaps
        what the caller loads next (the denoiser); the first use of .model (or of a tokenizer, through
        _read_once) waits for it, and a load that failed raises there. The thread is a daemon: an
        interrupted run exits without waiting for it."""
        if self._model is not None or self._pending is not None:
            return
        future: Future[tuple[Any, Offloaded | None]] = Future()

        def work() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                # a tokenizer costs seconds where transformers reads it (edit models; its imports more): here
                # rather than in front of the denoiser's load
                self.load_tokenizers()
                future.set_result(self._load())
            except BaseException as e:  # handed to whoever waits on .model, as a plain load would raise it
                future.set_exception(e)

        quick_thread_handoff()  # this thread's Python would otherwise hold up the caller's torch calls
        self._pending = future
        self._loader = threading.Thread(target=work, name="qimg-text-load", daemon=True)
        self._loader.start()

    @abc.abstractmethod
    def _load(self) -> tuple[Any, Offloaded | None]:
        """The family's encoder(s), placed as self.plan says, and their Offloaded when they visit the GPU."""

    @abc.abstractmethod
    def load_tokenizers(self) -> None:
        """Read the family's tokenizers (and image processor) now rather than at the first prompt."""

    def _read_once(self, attr: str, read: Callable[[], Any]) -> Any:
        """self.<attr> (a tokenizer, an image processor), read on first use. A background load reads these first,
        so one is taken from it rather than read twice (its error, if any, is raised where .model is used, or by
        the read here); on the worker itself nothing waits: that is where they are being read."""
        pending = self._pending
        if getattr(self, attr) is None and pending is not None and threading.current_thread() is not self._loader:
            pending.exception()
        if getattr(self, attr) is None:
            setattr(self, attr, read())
        return getattr(self, attr)

    @property
    def model(self) -> Any:
        if self._model is None:
            pending, self._pending = self._pending, None
            self._model, offloaded = pending.result() if pending is not None else self._load()
            if offloaded is not None and self.residency is not None:
                self.residency.add("text_encoder", offloaded)
        return self._model

    def release(self) -> None:
        """Free the text encoder(s) (a later prompt loads them again)."""
        if self._pending is not None:  # a background load finishes first, so that its memory is freed below
            pending, self._pending = self._pending, None
            with contextlib.suppress(BaseException):  # a load that failed left nothing to free
                self._model, _ = pending.result()
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
