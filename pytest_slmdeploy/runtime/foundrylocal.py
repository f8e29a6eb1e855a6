"""Foundry Local SDK, in-process: the model as Foundry Local itself runs it."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from pytest_slmdeploy.errors import RuntimeBackendError
from pytest_slmdeploy.foundry import FoundryRegistration, register
from pytest_slmdeploy.runtime.protocol import Generation, GenerationOptions, PromptInput, as_messages


class FoundryLocalBackend:
    """Registers the installed entry (idempotently), loads it and chats through ``ChatSession``."""

    name = "foundry"

    def __init__(self, model_dir: Path, *, cache_root: Path, model_name: str) -> None:
        from foundry_local_sdk.exception import FoundryLocalException

        self.registration: FoundryRegistration
        self.registration, self._model = register(model_dir, model_name, cache_root)
        try:
            self._model.load()
        except FoundryLocalException as exc:
            raise RuntimeBackendError(f"Foundry Local cannot load {self.registration.model_id}: {exc}") from None

    def generate(self, prompt: PromptInput, options: GenerationOptions, system: str | None = None) -> Generation:
        import foundry_local_sdk as fl
        from foundry_local_sdk.session_types import FinishReason

        messages = as_messages(prompt, system)
        search = fl.SearchOptions(max_output_tokens=options.max_new_tokens, do_sample=options.do_sample)
        if options.do_sample:
            search.temperature, search.top_p, search.top_k = options.temperature, options.top_p, options.top_k
            search.seed = options.seed
        else:
            search.temperature = 0.0
        makers = {"system": fl.MessageItem.system, "user": fl.MessageItem.user, "assistant": fl.MessageItem.assistant}
        pieces: list[str] = []
        ttft = 0.0
        try:
            with fl.ChatSession(self._model) as session:
                session.set_options(fl.RequestOptions(search=search))
                session.set_streaming(True)
                request = fl.Request()
                for message in messages:
                    request.add_item(makers[message["role"]](message["content"]))
                start = time.perf_counter()
                with request, session.process_streaming_request(request) as stream:
                    for item in stream:
                        text = _text_of(item)
                        if text and not pieces:
                            ttft = time.perf_counter() - start
                        pieces.append(text)
                    total = time.perf_counter() - start
                    final = stream.final_response
                    usage = final.get_usage()
                    reason = final.finish_reason
        except fl.FoundryLocalException as exc:
            raise RuntimeBackendError(f"Foundry Local failed to generate: {exc}") from None
        if reason == FinishReason.ERROR:
            raise RuntimeBackendError("Foundry Local reported an error finishing the answer")
        return Generation(
            text="".join(pieces),
            prompt_tokens=int(usage.prompt_tokens),
            new_tokens=int(usage.completion_tokens),
            finish_reason="length" if reason == FinishReason.LENGTH else "stop",
            ttft_s=ttft or total,
            total_s=total,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort at teardown: the manager may already be closed
            self._model.unload()


def _text_of(item: Any) -> str:
    text = getattr(item, "text", None)
    if isinstance(text, str):
        return text
    getter = getattr(item, "get_simple_text", None)
    return str(getter()) if callable(getter) else ""
