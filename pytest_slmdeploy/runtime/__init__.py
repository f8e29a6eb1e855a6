"""Stage 5: load an installed model behind one interface and generate with it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_slmdeploy.errors import SettingsError
from pytest_slmdeploy.runtime.protocol import (
    Backend,
    Generation,
    GenerationOptions,
    Message,
    PromptInput,
    as_messages,
)

__all__ = [
    "Backend",
    "Generation",
    "GenerationOptions",
    "Message",
    "PromptInput",
    "SlmModel",
    "as_messages",
    "open_model",
]


class SlmModel:
    """A loaded model as tests see it: ``generate(prompt)`` and ``chat(messages)``."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def generate(
        self,
        prompt: PromptInput,
        *,
        max_new_tokens: int = 128,
        system: str | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        seed: int | None = None,
        min_new_tokens: int = 0,
    ) -> Generation:
        """Answer a user prompt (or a conversation); greedy unless ``do_sample``."""
        options = GenerationOptions(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, min_new_tokens=min_new_tokens,
        )  # fmt: skip
        return self.backend.generate(prompt, options, system=system)

    def chat(self, messages: Sequence[Message], **options: Any) -> Generation:
        """Answer the last user message of a conversation (same options as :meth:`generate`)."""
        return self.generate(messages, **options)

    def close(self) -> None:
        self.backend.close()


def open_model(backend: str, model_dir: Path, *, cache_root: Path, model_name: str) -> SlmModel:
    """Load the installed model with ``backend`` (``ort-genai`` or ``foundry``)."""
    if backend == "ort-genai":
        from pytest_slmdeploy.runtime.ortgenai import OrtGenaiBackend

        return SlmModel(OrtGenaiBackend(model_dir))
    if backend == "foundry":
        from pytest_slmdeploy.runtime.foundrylocal import FoundryLocalBackend

        return SlmModel(FoundryLocalBackend(model_dir, cache_root=cache_root, model_name=model_name))
    raise SettingsError(f"slm_backend = {backend!r} is not one of ort-genai, foundry")
