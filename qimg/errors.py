"""Errors meant for people: one line saying what is wrong, a hint saying what to do next, an exit code."""

from __future__ import annotations


class QimgError(Exception):
    """Base of every error qimg raises on purpose; the CLI prints it as one line plus its hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(QimgError):
    """The command line itself is wrong (exit 2)."""

    exit_code = 2


class ModelNotFoundError(QimgError):
    """The model directory, or one of its components, is not there."""


class CheckpointError(QimgError):
    """A checkpoint does not match the network built for it (missing, unexpected or misshapen tensors)."""


class ConfigError(QimgError):
    """A config file is unreadable or describes something qimg does not support."""


class InputError(QimgError):
    """A request parameter is out of range or an input file cannot be used."""


class OutputError(QimgError):
    """The output cannot be written where it was asked for."""


class NumericsError(QimgError):
    """The computation produced NaN or infinite values."""


class GPUMemoryError(QimgError):
    """The GPU ran out of memory; the hint names the flags that would fit."""
