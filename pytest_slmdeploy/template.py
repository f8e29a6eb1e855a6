"""Chat templates: render them as transformers does, and derive Foundry Local's PromptTemplate.

Foundry Local's ``inference_model.json`` describes the prompt format as four
strings with a ``{Content}`` slot. A wrong one is a classic silent failure (the
model loads but answers badly), so it is derived from the model's own Jinja chat
template by rendering it with marker contents, never hard-coded, and every part
is checked by filling it back in against the template's own renderings.

How a PromptTemplate is filled (Foundry's catalog convention, and what
:func:`fill_prompt_template` does):

* ``prompt`` is the template's whole rendering of a single user message, ready
  for the answer: BOS text, default system prompt, dated header and all.
* ``system``, ``user`` and ``assistant`` are one turn each; the text ``prompt``
  puts before its user turn is the conversation's default opening. A
  conversation is its system part (or that default opening), its earlier turns,
  then ``prompt`` without the default opening.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONTENT = "{Content}"
# The date Llama 3's own template falls back to without a clock, and the one in Foundry Local's Llama 3.2
# entry. A PromptTemplate is written once per build, so a template's "Today Date" is frozen to this date
# rather than to the build day: the entry then does not depend on when it was built (same build key,
# same file, any day), and the template test compares like with like.
FIXED_DATE = date(2024, 7, 26)

_MARKS = tuple(f"\x00SLMDEPLOY{i}\x00" for i in range(4))
# Text that looks like a control token (ChatML, Llama 3, Phi-3, Gemma, Mistral): where turns end.
_CONTROL_TOKEN = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?[a-z][a-z_]{0,30}>|\[/?[A-Z][A-Z_]{0,30}\]")

Message = Mapping[str, str]


class TemplateError(ValueError):
    """The chat template cannot be rendered or split into Foundry's four parts."""


@dataclass(frozen=True)
class PromptTemplate:
    """Foundry Local's ``PromptTemplate`` for a chat template, and where it cannot match it."""

    parts: dict[str, str]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def supports_system(self) -> bool:
        return "system" in self.parts

    @property
    def supports_multi_turn(self) -> bool:
        return "user" in self.parts and "assistant" in self.parts


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
    today: date | None = None,
) -> str:
    """Render ``messages`` with a Hugging Face chat template (same Jinja setup as transformers).

    ``today`` is what the template's ``strftime_now`` sees (the machine's clock when None).
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        now = datetime.now()
        return (now if today is None else datetime.combine(today, now.time())).strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    config = tokenizer_config or {}
    specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **specials
        )
    except TemplateError:
        raise
    except Exception as exc:  # a template may fail in any way Jinja or its own code can
        raise TemplateError(f"chat template cannot be rendered: {exc}") from None


def _turn_end(between: str, specials: Iterable[str]) -> int:
    """Where one turn ends in the text between two messages: after its first control token and newlines."""
    ends = [(m.start(), m.end()) for m in _CONTROL_TOKEN.finditer(between)]
    ends += [(i, i + len(s)) for s in specials if s and (i := between.find(s)) >= 0]
    if ends:
        cut = min(ends)[1]
    elif "\n" in between:
        cut = between.index("\n") + 1
    else:
        return 0
    while cut < len(between) and between[cut] == "\n":
        cut += 1
    return cut


def _shown(text: str) -> str:
    """A rendering with the marker contents shown as {system}, {user}, ... for a note."""
    for mark, name in zip(_MARKS, ("system", "user", "assistant", "user2"), strict=True):
        text = text.replace(mark, "{" + name + "}")
    return repr(text)


def derive_prompt_template(
    template: str, tokenizer_config: Mapping[str, Any] | None = None, *, specials: Iterable[str] = ()
) -> PromptTemplate:
    """Foundry Local's ``PromptTemplate`` for ``template``, with a note for everything it cannot express.

    ``prompt`` always reproduces a single user message exactly; the turn parts are
    written only where filling them gives exactly the template's own rendering (see
    the module docstring), else left out with a note. Raises :class:`TemplateError`
    only when not even a single user message can be expressed.
    """
    config = dict(tokenizer_config or {})
    marks_system, marks_user, marks_assistant, marks_user2 = _MARKS
    known = [*specials, *(_token_text(config.get(k)) for k in ("bos_token", "eos_token"))]

    def render(messages: list[dict[str, str]], today: date = FIXED_DATE) -> str:
        return render_chat(template, messages, add_generation_prompt=True, tokenizer_config=config, today=today)

    def msg(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    try:
        single = render([msg("user", marks_user)])
    except TemplateError as exc:
        raise TemplateError(
            f"the chat template cannot render a single user message ({exc}); "
            "fix the template, or pass --slm-chat-template path/to/template.jinja"
        ) from None
    if single.count(marks_user) != 1:
        raise TemplateError(
            "the chat template does not put the user's message into the prompt exactly once "
            f"(it renders {_shown(single)}); fix the template, or pass --slm-chat-template path/to/template.jinja"
        )
    before, after = single.split(marks_user)
    parts = {"prompt": before + CONTENT + after}
    notes: list[str] = []

    try:
        turns = render([msg("user", marks_user), msg("assistant", marks_assistant), msg("user", marks_user2)])
    except TemplateError as exc:
        turns = ""
        notes.append(f"multi-turn conversations: the chat template refuses user/assistant/user ({exc})")
    opening = None
    if turns:
        pieces = (before + marks_user, marks_assistant, marks_user2 + after)
        shape = re.fullmatch("(.*)".join(re.escape(piece) for piece in pieces), turns, re.DOTALL)
        if shape is None:
            notes.append(f"multi-turn conversations: the chat template renders them as {_shown(turns)}")
        else:
            left, right = shape.group(1), shape.group(2)
            user_end, assistant_end = _turn_end(left, known), _turn_end(right, known)
            user_start = right[assistant_end:]
            if before.endswith(user_start):
                opening = before[: len(before) - len(user_start)]
                parts["user"] = user_start + CONTENT + left[:user_end]
                parts["assistant"] = left[user_end:] + CONTENT + right[:assistant_end]
            else:
                notes.append(f"multi-turn conversations: the first user turn differs from later ones ({_shown(turns)})")

    if opening is not None:
        try:
            with_system = render([msg("system", marks_system), msg("user", marks_user)])
        except TemplateError as exc:
            notes.append(f"system messages: the chat template refuses them ({exc}); put instructions in user messages")
        else:
            tail = parts["prompt"][len(opening) :].replace(CONTENT, marks_user)
            head = with_system[: len(with_system) - len(tail)]
            if with_system.endswith(tail) and head.count(marks_system) == 1:
                parts["system"] = head.replace(marks_system, CONTENT)
            elif marks_system not in with_system:
                notes.append("system messages: the chat template drops them")
            else:
                notes.append(
                    f"system messages: the chat template renders system + user as {_shown(with_system)}, which "
                    "Foundry's separate system part cannot express; put instructions in the user message"
                )

    result = PromptTemplate(_drop_unfaithful(parts, render), tuple(notes))
    notes.extend(_content_notes(template, config, result))
    if render([msg("user", marks_user)], today=date(2001, 2, 3)) != single:
        notes.append(
            f"dated header: the chat template writes today's date; PromptTemplate carries {FIXED_DATE:%d %b %Y}, "
            "the date Llama 3's template uses without a clock (as in Foundry Local's own Llama entries)"
        )
    return PromptTemplate(result.parts, tuple(notes))


def _drop_unfaithful(parts: dict[str, str], render: Any) -> dict[str, str]:
    """Keep only the turn parts whose fillings reproduce the template for every conversation it accepts."""
    conversations = {
        "user": [
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
        ],
        "system": [
            [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}],
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
        ],
    }
    kept = dict(parts)
    for key in ("user", "system"):
        for messages in conversations[key]:
            if key not in kept or (key == "system" and "user" not in kept and len(messages) > 2):
                continue
            try:
                expected = render(messages)
            except TemplateError:
                continue
            if fill_prompt_template(kept, messages) != expected:
                for dropped in ("user", "assistant", "system") if key == "user" else ("system",):
                    kept.pop(dropped, None)
    return kept


def _content_notes(template: str, config: Mapping[str, Any], derived: PromptTemplate) -> list[str]:
    """Where the template changes a message's text, which Foundry's ``{Content}`` slot cannot do."""
    padded = " \n padded \n "
    probes = {"user": [{"role": "user", "content": padded}]}
    if derived.supports_multi_turn:
        probes["assistant"] = [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": padded},
            {"role": "user", "content": "c"},
        ]
    changed = []
    for role, messages in probes.items():
        try:
            rendered = render_chat(
                template, messages, add_generation_prompt=True, tokenizer_config=config, today=FIXED_DATE
            )
        except TemplateError:
            continue
        if rendered != fill_prompt_template(derived.parts, messages):
            changed.append(role)
    if not changed:
        return []
    return [
        f"message text: the chat template strips whitespace around {' and '.join(changed)} messages; Foundry "
        "inserts {Content} as it is, so such messages render alike only without leading/trailing whitespace"
    ]


def _opening(parts: Mapping[str, str]) -> str:
    """The text ``prompt`` puts before its user turn (BOS, default system prompt, dated header)."""
    user = parts.get("user")
    head = parts["prompt"].split(CONTENT)[0]
    if user is None:
        return head
    user_start = user.split(CONTENT)[0]
    if not head.endswith(user_start):
        raise TemplateError("PromptTemplate's prompt does not end with its user part's opening")
    return head[: len(head) - len(user_start)]


def fill_prompt_template(parts: Mapping[str, str], messages: Sequence[Message]) -> str:
    """Render a conversation with a PromptTemplate, as a Foundry-style runtime would (see the module docstring)."""
    if not messages or messages[-1]["role"] != "user":
        raise TemplateError("a prompt needs a conversation that ends with a user message")
    if len(messages) == 1:
        return parts["prompt"].replace(CONTENT, messages[0]["content"])
    opening = _opening(parts)
    first, *middle = messages[:-1]
    if first["role"] == "system":
        if "system" not in parts:
            raise TemplateError("this PromptTemplate has no system part (the chat template cannot express one)")
        head = parts["system"].replace(CONTENT, first["content"])
    else:
        head, middle = opening, [first, *middle]
    for message in middle:
        if message["role"] not in parts or message["role"] == "system":
            raise TemplateError(f"this PromptTemplate cannot place a {message['role']} message after the first")
        head += parts[message["role"]].replace(CONTENT, message["content"])
    return head + parts["prompt"][len(opening) :].replace(CONTENT, messages[-1]["content"])
