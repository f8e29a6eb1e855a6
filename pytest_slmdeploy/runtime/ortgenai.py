"""ONNX Runtime GenAI, in-process: the default backend."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pytest_slmdeploy.errors import ContextOverflowError, RuntimeBackendError, first_line
from pytest_slmdeploy.runtime.protocol import Generation, GenerationOptions, PromptInput, as_messages
from pytest_slmdeploy.settings import auto_threads


def load_native(model_dir: Path, threads: int | None = None, spinning: bool | None = None) -> Any:
    """``onnxruntime_genai.Model`` of ``model_dir`` with ``threads`` intra-op threads (None: :func:`auto_threads`;
    0: ONNX Runtime GenAI's own default) and intra-op ``spinning`` on or off (None: ONNX Runtime's default, on).
    The installed files are not changed: the settings are overlaid in memory.

    ONNX Runtime GenAI's default is half the hardware threads (at most 16), which is 1 on a 2-vCPU machine:
    decode at 60% of the speed two threads give. Spinning threads wait for each other at every operator: fastest
    on a quiet machine, and 2.3x slower beside two busy processes (scripts/threads_under_load.py)."""
    import onnxruntime_genai as og

    count = auto_threads() if threads is None else threads
    options: dict[str, object] = {"intra_op_num_threads": count} if count > 0 else {}
    if spinning is not None:  # a session config entry: ONNX Runtime GenAI passes unknown string keys on
        options["session.intra_op.allow_spinning"] = "1" if spinning else "0"
    if not options:
        return og.Model(str(model_dir))
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


class OrtGenaiBackend:
    """Loads ``genai_config.json`` + ONNX files with ``onnxruntime_genai`` and decodes token by token."""

    name = "ort-genai"

    def __init__(self, model_dir: Path, threads: int | None = None, spinning: bool | None = None) -> None:
        import onnxruntime_genai as og

        self._og = og
        try:
            self.model = load_native(model_dir, threads, spinning)
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as exc:  # the native library raises plain RuntimeError with its own text
            raise RuntimeBackendError(f"ONNX Runtime GenAI cannot load {model_dir}: {exc}") from None
        config = json.loads((model_dir / "genai_config.json").read_text())
        self.context_length = int(config["model"]["context_length"])
        self.eos_token_ids = _as_list(config["model"]["eos_token_id"])
        self.vocab_size = int(config["model"]["vocab_size"])

    def render(self, prompt: PromptInput, system: str | None = None) -> str:
        """The prompt text exactly as the model's own chat template makes it."""
        messages = as_messages(prompt, system)
        try:
            return str(self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True))
        except RuntimeError as exc:  # the template's own raise_exception(), or a Jinja error, in native code
            reason = first_line(str(exc)) or type(exc).__name__
            raise RuntimeBackendError(f"the model's chat template refused the conversation: {reason}") from None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens)) if tokens else ""

    def generate(self, prompt: PromptInput, options: GenerationOptions, system: str | None = None) -> Generation:
        prompt_ids = self.encode(self.render(prompt, system))
        if len(prompt_ids) >= self.context_length:
            raise ContextOverflowError(
                f"prompt is {len(prompt_ids)} tokens; the model's context is {self.context_length} "
                "(prompt plus at least one new token must fit)"
            )
        max_length = min(self.context_length, len(prompt_ids) + options.max_new_tokens)
        params = self._og.GeneratorParams(self.model)
        search: dict[str, Any] = {"max_length": max_length, "do_sample": options.do_sample}
        if options.min_new_tokens:
            search["min_length"] = min(max_length, len(prompt_ids) + options.min_new_tokens)
        if options.do_sample:
            # A top_k over the vocabulary aborts the process in ORT GenAI 0.14; it means "no top-k filter".
            top_k = min(options.top_k, self.vocab_size)
            search.update(temperature=options.temperature, top_p=options.top_p, top_k=top_k)
            if options.seed is not None:
                search["random_seed"] = options.seed
        params.set_search_options(**search)
        start = time.perf_counter()
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(prompt_ids)
        new_ids: list[int] = []
        steps: list[float] = []
        ttft = cpu_start = 0.0
        last = start
        while not generator.is_done():
            generator.generate_next_token()
            new_ids.append(int(generator.get_next_tokens()[0]))
            now = time.perf_counter()
            if len(new_ids) == 1:
                ttft, cpu_start = now - start, time.process_time()
            else:
                steps.append(now - last)
            last = now
        total = last - start
        decode_cpu = time.process_time() - cpu_start if cpu_start else 0.0
        del generator
        stopped = bool(new_ids) and new_ids[-1] in self.eos_token_ids
        text_ids = new_ids[:-1] if stopped else new_ids
        return Generation(
            text=self.decode(text_ids),
            prompt_tokens=len(prompt_ids),
            new_tokens=len(text_ids),  # the end token is not part of the answer (as Foundry Local counts)
            finish_reason="stop" if stopped else "length",
            ttft_s=ttft,
            total_s=total,
            token_ids=tuple(text_ids),
            step_s=tuple(steps),
            decode_cpu_s=decode_cpu,
        )

    def close(self) -> None:
        self.tokenizer = None
        self.model = None


def _as_list(value: object) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [int(str(value))]
