"""Typed user-facing errors. Each carries a one-line message and a hint; the CLI prints both, no traceback."""

from __future__ import annotations


class Qwen35Error(Exception):
    """Base class for every error a user can cause and fix."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ModelNotFoundError(Qwen35Error):
    """The --model path or hub id cannot be resolved."""


class CheckpointError(Qwen35Error):
    """A checkpoint file is missing, truncated or inconsistent."""


class ConfigError(Qwen35Error):
    """config.json is missing or not a Qwen3.5 config."""


class InputError(Qwen35Error):
    """Bad user input: prompt over the context, unreadable image, bad flag value."""


class BudgetError(Qwen35Error):
    """A memory budget too small to hold what must be resident."""
