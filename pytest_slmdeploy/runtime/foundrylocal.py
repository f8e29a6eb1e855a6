"""Foundry Local SDK, in-process: the model as Foundry Local itself runs it.

The SDK (foundry-local-sdk 2.2.1, with its own ONNX Runtime GenAI core 0.18) takes chat messages and gives
text: it renders the entry's chat template, tokenizes and detokenizes inside. This backend keeps the
generation contract of :mod:`.ortgenai` on top of that (all measured with foundry-local-sdk 2.2.1):

* **Prompt tokens without a second model.** ``render``/``encode``/``decode``/``context_length``/
  ``eos_token_ids``/``vocab_size`` come from the entry's files: its chat template rendered as transformers
  does (:func:`~pytest_slmdeploy.template.render_chat`; the SDK fills ``strftime_now`` with the machine's
  date too), ``tokenizer.json`` through ``tokenizers`` without added special tokens (what ORT GenAI's
  encode gives for byte-level BPE), and ``genai_config.json``. The context check and the cap on new tokens
  use the SDK's own count (``ChatSession.preflight_request``), so a prompt that does not fit raises
  :class:`~pytest_slmdeploy.errors.ContextOverflowError`, as with ORT GenAI, never the SDK's budget error.
* **min_new_tokens.** The SDK has no min-length option (``SearchOptions`` has none; unknown
  ``additional_options`` such as ``min_length`` are silently ignored). Its guidance option does what ORT
  GenAI's ``min_length`` does: the Lark grammar ``<[^EOS ids]>{n} <[*]>*`` masks the end tokens for the first
  ``n`` tokens and nothing else.
* **The end token's text.** The SDK detokenizes every generated token, the end token too, with ORT GenAI's
  streaming decoder, one text piece per token. With ``clean_up_tokenization_spaces: true`` (Llama 3's
  tokenizer_config) that decoder writes a skipped special token as ``" "`` (not for tokenizer_config's
  eos_token when the BPE vocabulary holds it; Llama 3 keeps its specials outside it), so answers ended with a
  space that ORT GenAI's whole-sequence decode does not write. That piece of the end token is dropped.
* **Special tokens the text hides.** The SDK's text drops special tokens (or shows that space) and no API
  gives token ids. ``token_ids`` is rebuilt from the streamed pieces (a piece that is one vocabulary token is
  that token), and a special token the model emitted is found by replaying the greedy answer with special
  tokens masked (guidance): a greedy answer changes exactly when a masked token was on its path. A replay
  runs only when the pieces cannot account for every token the SDK counted (a hidden special token writes no
  piece) or hold a lone space a special token may have written; never for sampled or fixed-length answers.
* **What the SDK refuses or cuts.** Message text goes to the SDK as C strings, so it ends at a NUL: both the
  request and ``render`` cut each message there. A request with nothing to generate from (no message text
  and no conversation to continue, e.g. one empty user message) is refused: that is
  :class:`~pytest_slmdeploy.errors.EmptyPromptError`. The SDK takes temperatures up to 2.0 (``max_temperature``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pytest_slmdeploy.errors import ContextOverflowError, EmptyPromptError, RuntimeBackendError, first_line
from pytest_slmdeploy.foundry import FoundryRegistration, register
from pytest_slmdeploy.runtime.protocol import Generation, GenerationOptions, PromptInput
from pytest_slmdeploy.runtime.protocol import as_messages as checked_messages

LONE_SPACES = (" ", "  ")  # what the streaming decoder writes for a special token with clean_up_tokenization_spaces


class FoundryLocalBackend:
    """Registers the installed entry (idempotently), loads it and chats through ``ChatSession``."""

    name = "foundry"
    max_temperature = 2.0  # the SDK refuses more: "temperature must be in the range [0.0, 2.0]"

    def __init__(self, model_dir: Path, *, cache_root: Path, model_name: str) -> None:
        self.entry = EntryText(model_dir)
        self.context_length = self.entry.context_length
        self.eos_token_ids = self.entry.eos_token_ids
        self.vocab_size = self.entry.vocab_size
        self.replays = 0  # greedy replays run to find hidden special tokens (see the module docstring)
        # The format family needs the audit; a memory soak measures the runtime, whose requests it multiplies.
        self.audit_special_tokens = True
        self._leaked: list[int] = []  # special tokens found before: the next search tries them first
        self.registration: FoundryRegistration
        self.registration, self._model = register(model_dir, model_name, cache_root)
        self.load()

    def load(self) -> None:
        """Load the model into Foundry Local (again, after another handle of the same model id unloaded it)."""
        from foundry_local_sdk.exception import FoundryLocalException

        try:
            self._model.load()
        except FoundryLocalException as exc:
            raise RuntimeBackendError(f"Foundry Local cannot load {self.registration.model_id}: {exc}") from None

    def render(self, prompt: PromptInput, system: str | None = None) -> str:
        """The prompt text as the SDK makes it from the entry's chat template."""
        return self.entry.render(as_messages(prompt, system))

    def encode(self, text: str) -> list[int]:
        return self.entry.encode(text)

    def decode(self, tokens: list[int]) -> str:
        return self.entry.decode(tokens)

    def generate(self, prompt: PromptInput, options: GenerationOptions, system: str | None = None) -> Generation:
        import foundry_local_sdk as fl

        messages = as_messages(prompt, system)
        try:
            prompt_tokens, context = self._budget(messages)
            if prompt_tokens >= context:
                raise ContextOverflowError(
                    f"prompt is {prompt_tokens} tokens; the model's context is {context} "
                    "(prompt plus at least one new token must fit)"
                )
            max_new = min(options.max_new_tokens, context - prompt_tokens)
            min_new = min(options.min_new_tokens, max_new)
            grammar = f"start: {_token_set(self.eos_token_ids, exclude=True)}{{{min_new}}} <[*]>*" if min_new else None
            run = self._run(messages, options, max_new, grammar)
            pieces = self.entry.answer_pieces(run)
            ids = [self.entry.piece_ids(p) for p in pieces]
            audit = self.audit_special_tokens and not options.do_sample and not min_new
            if audit and self.entry.may_hide_special(pieces, run.new_tokens):
                found = self._hidden_special(lambda masked: self._run(messages, options, max_new, _mask(masked)), run)
                if found is not None:
                    special, at = found
                    if self.entry.specials_write_space and at < len(pieces) and pieces[at] in LONE_SPACES:
                        del pieces[at], ids[at]  # the space the special token wrote: ORT GenAI writes nothing
                    ids.insert(at, [special])
        except fl.FoundryLocalException as exc:
            reason = first_line(str(exc))
            if "nothing to generate from" in reason:
                raise EmptyPromptError(
                    "Foundry Local refuses a request that has nothing to generate from "
                    "(no message text and no conversation to continue)"
                ) from None
            raise RuntimeBackendError(f"Foundry Local failed to generate: {reason}") from None
        return Generation(
            text="".join(pieces),
            prompt_tokens=run.prompt_tokens,
            new_tokens=run.new_tokens,
            finish_reason="stop" if run.stopped else "length",
            ttft_s=run.ttft_s or run.total_s,
            total_s=run.total_s,
            token_ids=tuple(i for piece in ids for i in piece),
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort at teardown: the manager may already be closed
            self._model.unload()

    def _request(self, messages: Sequence[dict[str, str]]) -> Any:
        import foundry_local_sdk as fl

        makers = {"system": fl.MessageItem.system, "user": fl.MessageItem.user, "assistant": fl.MessageItem.assistant}
        request = fl.Request()
        for message in messages:
            request.add_item(makers[message["role"]](message["content"]))
        return request

    def _budget(self, messages: Sequence[dict[str, str]]) -> tuple[int, int]:
        """The SDK's own prompt token count and context, for the prompt it will really generate from."""
        import foundry_local_sdk as fl

        with fl.ChatSession(self._model) as session, self._request(messages) as request:
            budget = session.preflight_request(request)
        return int(budget.prompt_tokens), int(budget.context_limit_tokens)

    def _run(
        self, messages: Sequence[dict[str, str]], options: GenerationOptions, max_new: int, grammar: str | None
    ) -> SdkRun:
        """One generation in a fresh session (a ChatSession keeps earlier turns), streamed for TTFT."""
        import foundry_local_sdk as fl
        from foundry_local_sdk.session_types import FinishReason

        search = fl.SearchOptions(max_output_tokens=max_new, do_sample=options.do_sample)
        if options.do_sample:
            search.temperature, search.top_p, search.top_k = options.temperature, options.top_p, options.top_k
            search.seed = options.seed
        else:
            search.temperature = 0.0
        extra = {"guidance_type": "lark_grammar", "guidance_data": grammar} if grammar else {}
        pieces: list[str] = []
        ttft = 0.0
        with fl.ChatSession(self._model) as session:
            session.set_options(fl.RequestOptions(search=search, additional_options=extra))
            session.set_streaming(True)
            start = time.perf_counter()
            with self._request(messages) as request, session.process_streaming_request(request) as stream:
                for item in stream:
                    text = _text_of(item)
                    if text and not pieces:
                        ttft = time.perf_counter() - start
                    if text:
                        pieces.append(text)
                total = time.perf_counter() - start
                with stream.final_response as final:
                    usage = final.get_usage()
                    reason = final.finish_reason
        if reason == FinishReason.ERROR:
            raise RuntimeBackendError("Foundry Local reported an error finishing the answer")
        stopped = reason != FinishReason.LENGTH
        return SdkRun(tuple(pieces), int(usage.prompt_tokens), int(usage.completion_tokens), stopped, ttft, total)

    def _hidden_special(self, replay: Callable[[Sequence[int]], SdkRun], original: SdkRun) -> tuple[int, int] | None:
        """A special token on the greedy answer's path, and the piece it came before; None if there is none.

        Masking tokens changes a greedy answer exactly when one of them was on its path, so group testing finds
        one: the tokens that leaked before first, then halves of the rest. Where the answer with only that token
        masked starts to differ is where the model emitted it.
        """
        replays: dict[tuple[int, ...], SdkRun] = {}

        def masked(ids: Sequence[int]) -> SdkRun:
            if tuple(ids) not in replays:
                self.replays += 1
                replays[tuple(ids)] = replay(ids)
            return replays[tuple(ids)]

        def on_path(ids: Sequence[int]) -> bool:
            return bool(ids) and masked(ids).outcome != original.outcome

        def one_of(ids: Sequence[int]) -> int:  # ids hold at least one token of the path
            while len(ids) > 1:
                half = ids[: len(ids) // 2]
                ids = half if on_path(half) else ids[len(ids) // 2 :]
            return ids[0]

        maskable = self.entry.maskable_special_ids
        known = [i for i in self._leaked if i in maskable]
        for group in (known, [i for i in maskable if i not in known]):
            if on_path(group):
                found = one_of(group)
                if found not in self._leaked:
                    self._leaked.append(found)
                other = masked([found]).pieces
                at = next((i for i, (a, b) in enumerate(zip(original.pieces, other, strict=False)) if a != b), None)
                return found, min(len(original.pieces), len(other)) if at is None else at
        return None


@dataclass(frozen=True)
class SdkRun:
    """One SDK generation: its streamed text pieces (one per token that wrote text) and its counts."""

    pieces: tuple[str, ...]
    prompt_tokens: int
    new_tokens: int  # the SDK's completion_tokens: the end token is not counted
    stopped: bool
    ttft_s: float
    total_s: float

    @property
    def outcome(self) -> tuple[tuple[str, ...], int, bool]:
        return self.pieces, self.new_tokens, self.stopped


class EntryText:
    """The installed entry's tokenizer, chat template and limits, from its files (no model is loaded)."""

    def __init__(self, entry_dir: Path) -> None:
        from tokenizers import Tokenizer

        from pytest_slmdeploy.errors import SourceError
        from pytest_slmdeploy.source import read_chat_template

        def read(name: str) -> dict[str, Any]:
            path = entry_dir / name
            try:
                data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except (OSError, ValueError) as exc:
                raise RuntimeBackendError(f"{path} cannot be read: {exc}") from None
            return data if isinstance(data, dict) else {}

        self.entry_dir = entry_dir
        tokenizer_json = read("tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_str(json.dumps(_as_ort_genai_encodes(tokenizer_json)))
        except Exception as exc:  # tokenizers raises a plain Exception from Rust
            raise RuntimeBackendError(f"{entry_dir / 'tokenizer.json'} cannot be loaded: {exc}") from None
        try:
            self.chat_template, self.tokenizer_config = read_chat_template(entry_dir)
        except SourceError as exc:
            raise RuntimeBackendError(str(exc)) from None
        model = read("genai_config.json").get("model", {})
        try:
            self.context_length = int(model["context_length"])
            eos = model["eos_token_id"]
            self.eos_token_ids = [int(v) for v in eos] if isinstance(eos, list) else [int(eos)]
            self.vocab_size = int(model["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RuntimeBackendError(f"{entry_dir / 'genai_config.json'} has no usable model.{exc}") from None
        added = [t for t in tokenizer_json.get("added_tokens", []) if isinstance(t, dict)]
        self.special_ids = frozenset(int(t["id"]) for t in added if t.get("special", True))
        self.maskable_special_ids = sorted(self.special_ids - set(self.eos_token_ids))
        self.byte_level = (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel"
        self.specials_write_space = (
            self.byte_level and self.tokenizer_config.get("clean_up_tokenization_spaces") is True
        )
        self.end_piece = self._end_piece(tokenizer_json)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        from pytest_slmdeploy.template import TemplateError, render_chat

        if self.chat_template is None:
            raise RuntimeBackendError("the installed model has no chat template (chat_template.jinja)")
        try:
            return render_chat(
                self.chat_template, messages, add_generation_prompt=True, tokenizer_config=self.tokenizer_config
            )
        except TemplateError as exc:
            raise RuntimeBackendError(f"the model's chat template refused the conversation: {exc}") from None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True)) if tokens else ""

    def piece_ids(self, piece: str) -> list[int]:
        """The token that wrote a streamed piece, when the piece is one vocabulary token; else its encoding."""
        # Byte-level BPE writes each byte as a printable stand-in; SentencePiece-style vocabularies a space as "▁".
        byte_level = "".join(_byte_chars()[b] for b in piece.encode("utf-8"))
        token = byte_level if self.byte_level else piece.replace(" ", "\u2581")
        found = self.tokenizer.token_to_id(token)
        return [int(found)] if found is not None and found not in self.special_ids else self.encode(piece)

    def _end_piece(self, tokenizer_json: dict[str, Any]) -> tuple[str, str]:
        """What ORT GenAI's streaming decoder writes for an end token: as the stream's first token, and after.

        Its byte-level BPE decoder, with clean_up_tokenization_spaces, writes a skipped special token as " "
        (with one more " " before it as the stream's first token), except tokenizer_config's eos_token when the
        BPE vocabulary holds it. Other decoders (SentencePiece) are not changed: measured for byte-level BPE only.
        """
        if not self.specials_write_space:
            return "", ""
        eos = self.tokenizer_config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
        vocab_eos = vocab.get(eos) if isinstance(eos, str) else None
        after = {"" if i == vocab_eos else " " for i in self.eos_token_ids if i in self.special_ids}
        if len(after) != 1:  # no special end token, or some write a space and some do not: which one ended?
            return "", ""
        tail = after.pop()
        return " " + tail, tail

    def answer_pieces(self, run: SdkRun) -> list[str]:
        """The answer's pieces as ORT GenAI decodes them: without the piece the SDK's end token wrote."""
        end = self.end_piece[0 if run.new_tokens == 0 else 1]
        pieces = list(run.pieces)
        if run.stopped and end and pieces and pieces[-1] == end:
            pieces.pop()
        return pieces

    def may_hide_special(self, pieces: Sequence[str], new_tokens: int) -> bool:
        """Whether the text may hide a special token: fewer pieces than tokens (a skipped token writes none;
        so does a byte of an unfinished character), or a lone space that a special token writes with
        clean_up_tokenization_spaces (as does a space token)."""
        if not self.maskable_special_ids:
            return False
        return new_tokens > len(pieces) or (self.specials_write_space and any(p in LONE_SPACES for p in pieces))


def _as_ort_genai_encodes(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json changed to encode as ORT GenAI (and so the SDK) does, where the two differ.

    A Metaspace pre-tokenizer that prepends "▁" ("first"/"always", Mistral v0.3): ORT GenAI puts "▁" before
    every text segment between special tokens, even one starting with a space ("[INST] Hi" gives "▁", "▁Hi");
    tokenizers only before the text's start, and not before a space. A normalizer that always prepends, as
    Phi-3's tokenizer.json has, encodes as ORT GenAI does (measured on the tiny Mistral v0.3 family).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") != "Metaspace" or pre.get("prepend_scheme") == "never" or pre.get("split", False):
        return tokenizer_json
    replacement = str(pre.get("replacement", "\u2581"))
    normalizers = [tokenizer_json["normalizer"]] if tokenizer_json.get("normalizer") else []
    normalizers += [
        {"type": "Prepend", "prepend": replacement},
        {"type": "Replace", "pattern": {"String": " "}, "content": replacement},
    ]
    return {**tokenizer_json, "pre_tokenizer": None, "normalizer": {"type": "Sequence", "normalizers": normalizers}}


@cache
def _byte_chars() -> tuple[str, ...]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's bytes_to_unicode)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return tuple(table[b] for b in range(256))


def as_messages(prompt: PromptInput, system: str | None = None) -> list[dict[str, str]]:
    """The checked messages as the SDK receives them: each text ends at its first NUL (C strings)."""
    return [{**m, "content": m["content"].split("\x00", 1)[0]} for m in checked_messages(prompt, system)]


def _token_set(ids: Sequence[int], *, exclude: bool) -> str:
    """A Lark token-set literal in llguidance syntax: ``<[1-3,7]>``; ``<[^1-3,7]>`` is every other token."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    body = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"<[{'^' if exclude else ''}{body}]>"


def _mask(ids: Sequence[int]) -> str:
    return f"start: {_token_set(ids, exclude=True)}*"


def _text_of(item: Any) -> str:
    text = getattr(item, "text", None)
    if isinstance(text, str):
        return text
    getter = getattr(item, "get_simple_text", None)
    return str(getter()) if callable(getter) else ""
