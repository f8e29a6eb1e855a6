"""Errors the plugin reports to users: one line each, saying the value, the limit and the fix."""

from __future__ import annotations


def first_line(text: str) -> str:
    """The first non-blank line, stripped ("" when there is none): a library's message as one line."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (``Type`` alone for an empty message), for one-line errors."""
    text = first_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SlmDeployError(Exception):
    """Base class: its message is the whole, one-line, user-facing explanation."""


class SettingsError(SlmDeployError):
    """An option or ini value is invalid."""


class SourceError(SlmDeployError):
    """The Hugging Face model folder cannot be used."""


class BuildError(SlmDeployError):
    """Olive did not produce a usable model."""


class CacheError(SlmDeployError):
    """The model cache cannot be read or written."""


class RuntimeBackendError(SlmDeployError):
    """A backend could not load the model or generate."""


class ContextOverflowError(RuntimeBackendError):
    """The prompt does not fit the model's context: a refusal the edge checks accept."""


class EmptyPromptError(RuntimeBackendError):
    """The runtime refuses a request without message text (Foundry Local does): a refusal the edge checks accept."""


class GenerationOptionsError(SlmDeployError, ValueError):
    """Invalid generation settings (max tokens, temperature, top_p, ...)."""
