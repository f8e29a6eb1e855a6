"""Chat templates: render them as transformers does, and derive Foundry Local's PromptTemplate.

Foundry Local's ``inference_model.json`` describes the prompt format as four
strings with a ``{Content}`` slot. A wrong one is a classic silent failure (the
model loads but answers badly), so it is derived from the model's own Jinja chat
template by rendering it with marker contents, never hard-coded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONTENT = "{Content}"
_MARK = "\x00SLMDEPLOY_CONTENT\x00"

Message = Mapping[str, str]


class TemplateError(ValueError):
    """The chat template cannot be rendered or split into Foundry's four parts."""


def _token_text(value: object) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def render_chat(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool,
    tokenizer_config: Mapping[str, Any] | None = None,
) -> str:
    """Render ``messages`` with a Hugging Face chat template (same Jinja setup as transformers)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    config = tokenizer_config or {}
    specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **specials
        )
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template cannot be rendered: {exc}") from None


def _without_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise TemplateError(f"the chat template does not render {what} as a suffix of the shorter conversation")
    return text[len(prefix) :]


def derive_prompt_template(template: str, tokenizer_config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Foundry Local's ``PromptTemplate`` (system/user/assistant/prompt with ``{Content}``).

    ``system`` opens a conversation (with whatever the template puts first, e.g. a BOS
    text); ``user``, ``assistant`` and ``prompt`` (the last user turn plus the start of
    the answer) are what the template adds for that message. So a conversation that
    starts with a system message, filled part by part, is exactly the template's own
    rendering. Foundry's format has no slot for a template's *default* system prompt:
    pass a system message where the model relies on one. A template that refuses the
    system role (Gemma-style) gets a ``system`` part equal to its first user turn.
    """

    def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
        return render_chat(template, msgs, add_generation_prompt=gen, tokenizer_config=tokenizer_config)

    user_msg = {"role": "user", "content": _MARK}
    assistant_msg = {"role": "assistant", "content": _MARK}
    opener = {"role": "system", "content": _MARK}
    try:
        first = render([opener])
    except TemplateError:
        opener = user_msg
        first = render([opener])
    turn = render([opener, user_msg])
    parts = {
        "system": first,
        "user": _without_prefix(turn, first, "a user turn"),
        "assistant": _without_prefix(render([opener, user_msg, assistant_msg]), turn, "an assistant turn"),
        "prompt": _without_prefix(render([opener, user_msg], gen=True), first, "the last user turn"),
    }
    for role, text in parts.items():
        if text.count(_MARK) != 1:
            raise TemplateError(f"the chat template's {role} part does not contain the message exactly once")
    return {role: text.replace(_MARK, CONTENT) for role, text in parts.items()}


def fill_prompt_template(parts: Mapping[str, str], messages: Sequence[Message]) -> str:
    """Render a conversation with a PromptTemplate, as a Foundry-style runtime would.

    The last user message uses ``prompt`` (it opens the assistant's turn).
    """
    if not messages or messages[-1]["role"] != "user":
        raise TemplateError("a prompt needs a conversation that ends with a user message")
    head = "".join(parts[m["role"]].replace(CONTENT, m["content"]) for m in messages[:-1])
    return head + parts["prompt"].replace(CONTENT, messages[-1]["content"])
