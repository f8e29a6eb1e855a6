"""Stage 5: load an installed model behind one interface and generate with it."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from pytest_slmdeploy.errors import SettingsError
from pytest_slmdeploy.measure import malloc_in_use_bytes, rss_bytes
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
    "Request",
    "RssSample",
    "SlmModel",
    "as_messages",
    "open_model",
    "request_key",
]


class RssSample(NamedTuple):
    """This process's RSS right after a generation; ``segment`` tells generations made one after the other
    (in one test) from those with other work in between, ``tokens`` how long a sequence it processed (of which
    ``new_tokens`` generated), ``rss_before`` the RSS when it started, ``request`` its key in
    :attr:`SlmModel.requests` (so the memory family can replay the session's own kinds of request), ``heap`` and
    ``heap_before`` the C allocator's bytes in use after and before it."""

    segment: int
    tokens: int
    rss: int
    rss_before: int = 0
    new_tokens: int = 0
    request: str = ""
    heap: int = 0  # the C allocator's bytes in use after the generation (0: unknown), see malloc_in_use_bytes
    heap_before: int = 0


class Request(NamedTuple):
    """One generation's request as the model received it: the whole conversation and the options."""

    messages: tuple[tuple[tuple[str, str], ...], ...]  # hashable messages: ((key, value), ...) per message
    options: GenerationOptions

    @property
    def chat(self) -> list[dict[str, str]]:
        return [dict(message) for message in self.messages]


def request_key(prompt: PromptInput, system: str | None, options: GenerationOptions) -> str:
    """The key of a request in :attr:`SlmModel.requests`: the whole conversation and the options."""
    return sys.intern(json.dumps([as_messages(prompt, system), options.__dict__], sort_keys=True))  # one copy


class SlmModel:
    """A loaded model as tests see it: ``generate(prompt)`` and ``chat(messages)``."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._answers: dict[str, Generation] = {}
        self.memory_log: list[RssSample] = []  # every generation's RSS: the memory family's evidence
        self.requests: dict[str, Request] = {}  # every distinct request of the session, once
        self.segment = 0  # bumped by the caller between runs of generations (a test), see RssSample

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
        before, heap_before = rss_bytes(), malloc_in_use_bytes()
        generation = self.backend.generate(prompt, options, system=system)
        after, heap = rss_bytes(), malloc_in_use_bytes()
        key = request_key(prompt, system, options)
        if key not in self.requests:  # kept once: repeating a request must not grow the log's memory
            self.requests[key] = Request(tuple(tuple(sorted(m.items())) for m in as_messages(prompt, system)), options)
        tokens = generation.prompt_tokens + generation.new_tokens
        self.memory_log.append(
            RssSample(self.segment, tokens, after, before, generation.new_tokens, key, heap, heap_before)
        )
        return generation

    def answer(self, prompt: PromptInput, *, max_new_tokens: int = 128, system: str | None = None) -> Generation:
        """The greedy answer to ``prompt``, generated once per loaded model: the checks that judge answers (the
        domain cases, the format family) share it instead of generating it again. Greedy decoding is
        deterministic, so the answer is the same either way; timing and memory checks call :meth:`generate`."""
        key = json.dumps([as_messages(prompt, system), max_new_tokens], sort_keys=True)
        if key not in self._answers:
            self._answers[key] = self.generate(prompt, max_new_tokens=max_new_tokens, system=system)
        return self._answers[key]

    def chat(self, messages: Sequence[Message], **options: Any) -> Generation:
        """Answer the last user message of a conversation (same options as :meth:`generate`)."""
        return self.generate(messages, **options)

    def close(self) -> None:
        self.backend.close()


def open_model(
    backend: str,
    model_dir: Path,
    *,
    cache_root: Path,
    model_name: str,
    threads: int | None = None,
    spinning: bool | None = None,
) -> SlmModel:
    """Load the installed model with ``backend`` (``ort-genai`` or ``foundry``); ``threads``: ONNX Runtime
    GenAI's intra-op threads (None: the CPUs this process may use; 0: ONNX Runtime GenAI's default);
    ``spinning``: its intra-op threads spin while they wait (None: ONNX Runtime's default, on)."""
    if backend == "ort-genai":
        from pytest_slmdeploy.runtime.ortgenai import OrtGenaiBackend

        return SlmModel(OrtGenaiBackend(model_dir, threads, spinning))
    if backend == "foundry":
        from pytest_slmdeploy.runtime.foundrylocal import FoundryLocalBackend

        return SlmModel(FoundryLocalBackend(model_dir, cache_root=cache_root, model_name=model_name))
    raise SettingsError(f"slm_backend = {backend!r} is not one of ort-genai, foundry")
