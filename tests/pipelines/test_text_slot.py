"""The text side loads on a worker thread when asked (overlapping the denoiser's load) and hands over the same
model, or the same error, as a load on first use."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from qimg.errors import CheckpointError, ConfigError
from qimg.pipelines.text_slot import TextEncoderSlot


@dataclass
class _Slot(TextEncoderSlot):
    fail: bool = False
    bad_tokenizer: bool = False
    started: threading.Event | None = None
    release_load: threading.Event | None = None
    threads: list[str] | None = None
    _tokenizer: Any = None

    def load_tokenizers(self) -> None:
        _ = self.tokenizer

    @property
    def tokenizer(self) -> Any:  # as the families' encoders read theirs
        return self._read_once("_tokenizer", self._read_tokenizer)

    def _read_tokenizer(self) -> Any:
        self.threads.append(f"tokenizer on {threading.current_thread().name}")  # type: ignore[union-attr]
        if self.bad_tokenizer:
            raise ConfigError("tokenizer/ does not hold a readable tokenizer")
        return object()

    def _load(self) -> tuple[Any, None]:
        self.threads.append(threading.current_thread().name)  # type: ignore[union-attr]
        if self.started is not None:
            self.started.set()
        if self.release_load is not None:
            assert self.release_load.wait(10)
        if self.fail:
            raise CheckpointError("text_encoder/ weights do not match the network")
        return object(), None


def _slot(**kw: Any) -> _Slot:
    return _Slot(ref=None, family=None, torch_device=torch.device("cpu"), torch_dtype=torch.float32,  # type: ignore[arg-type]
                 threads=[], **kw)


def test_background_load_runs_on_a_worker_and_model_waits_for_it() -> None:
    started, go = threading.Event(), threading.Event()
    slot = _slot(started=started, release_load=go)
    slot.load_in_background()
    assert started.wait(10)
    assert not slot.loaded  # still loading: nothing handed over yet
    go.set()
    model = slot.model
    assert slot.loaded and slot.model is model
    assert slot.threads == ["tokenizer on qimg-text-load", "qimg-text-load"]  # once each, on the worker


def test_a_failed_background_load_raises_at_first_use() -> None:
    slot = _slot(fail=True)
    slot.load_in_background()
    with pytest.raises(CheckpointError, match="do not match"):
        slot.model  # noqa: B018
    slot.release()  # nothing loaded, nothing to free


def test_release_waits_for_a_background_load_then_frees_it() -> None:
    slot = _slot()
    slot.load_in_background()
    slot.release()
    assert not slot.loaded
    slot.model  # noqa: B018  (loads again, on this thread)
    assert slot.threads == ["tokenizer on qimg-text-load", "qimg-text-load", "MainThread"]


def test_asking_twice_loads_once() -> None:
    slot = _slot()
    slot.load_in_background()
    slot.load_in_background()
    slot.model  # noqa: B018
    slot.load_in_background()  # already loaded: no new load
    assert slot.threads == ["tokenizer on qimg-text-load", "qimg-text-load"]


def test_a_tokenizer_asked_for_during_a_background_load_waits_for_it() -> None:
    started, go = threading.Event(), threading.Event()
    slot = _slot(started=started, release_load=go)
    slot.load_in_background()
    assert started.wait(10)  # the worker has read the tokenizer and is loading the model
    threading.Timer(0.2, go.set).start()
    tokenizer = slot.tokenizer  # waits for the worker, then takes its tokenizer: no second read here
    assert tokenizer is slot.tokenizer
    assert slot.threads == ["tokenizer on qimg-text-load", "qimg-text-load"]


def test_a_broken_tokenizer_read_in_the_background_fails_at_the_text_phase() -> None:
    slot = _slot(bad_tokenizer=True)
    slot.load_in_background()
    with pytest.raises(ConfigError, match="readable tokenizer"):
        slot.model  # noqa: B018
    with pytest.raises(ConfigError, match="readable tokenizer"):
        slot.tokenizer  # noqa: B018  (read again here: the same one-line error)
    assert "qimg-text-load" not in slot.threads  # the model was never loaded
