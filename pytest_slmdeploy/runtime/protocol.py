"""The one interface every backend offers: load an installed model, generate, close."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pytest_slmdeploy.errors import GenerationOptionsError

Message = Mapping[str, str]
PromptInput = str | Sequence[Message]
FinishReason = Literal["stop", "length"]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class GenerationOptions:
    """Greedy by default, so results repeat; sampling only when asked."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None
    min_new_tokens: int = 0  # benchmarks: a fixed answer length (the end token is ignored until then)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise GenerationOptionsError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise GenerationOptionsError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise GenerationOptionsError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationOptionsError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise GenerationOptionsError(
                f"min_new_tokens must be 0..max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise GenerationOptionsError(f"top_k must be an integer of at least 1, got {self.top_k!r}")


@dataclass(frozen=True)
class Generation:
    """One answer and how it came about."""

    text: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: FinishReason
    ttft_s: float
    total_s: float
    token_ids: tuple[int, ...] = ()  # the answer's token ids where the backend exposes them (ORT GenAI)
    step_s: tuple[float, ...] = ()  # seconds of each decode step after the first token, where the backend times them
    decode_cpu_s: float = 0.0  # this process's CPU seconds from the first token to the last (0: not in-process)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second after the first token arrived."""
        decode_s = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


def as_messages(prompt: PromptInput, system: str | None = None) -> list[dict[str, str]]:
    """Normalise a prompt string or a message list into checked chat messages."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    if not messages:
        raise GenerationOptionsError("messages must not be empty")
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise GenerationOptionsError(
                f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': str}}, got {message!r}"
            )
    if messages[-1]["role"] != "user":
        raise GenerationOptionsError("the last message must be from the user")
    return messages


class Backend(Protocol):
    """A loaded model. Implementations: :mod:`.ortgenai` (default) and :mod:`.foundrylocal`."""

    name: str

    def generate(self, prompt: PromptInput, options: GenerationOptions, system: str | None = None) -> Generation:
        """Answer ``prompt`` (a user message or a conversation)."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...
