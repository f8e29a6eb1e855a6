"""Checklist item 5: edge cases and invalid input never crash the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytest_slmdeploy.errors import GenerationOptionsError, RuntimeBackendError

# Settings that must be refused with GenerationOptionsError, never reach the runtime.
INVALID_OPTIONS: tuple[dict[str, Any], ...] = (
    {"max_new_tokens": 0},
    {"max_new_tokens": -5},
    {"max_new_tokens": 2.5},
    {"do_sample": True, "temperature": 0.0},
    {"do_sample": True, "temperature": -1.0},
    {"do_sample": True, "temperature": float("nan")},
    {"do_sample": True, "top_p": 0.0},
    {"do_sample": True, "top_p": 1.5},
    {"do_sample": True, "top_k": 0},
)


def prompts_strategy(template_tokens: frozenset[str], max_chars: int) -> Any:
    """Hypothesis strategy: empty, whitespace, long, any unicode, emoji, RTL, control chars, NUL, template tokens."""
    from hypothesis import strategies as st

    specials = sorted(template_tokens) or ["<|im_start|>"]
    return st.one_of(
        st.just(""),
        st.text(alphabet=" \t\n\r\u00a0\u2028", max_size=20),
        st.text(max_size=max_chars),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=max_chars),
        st.sampled_from(
            ["😀🚀👩‍👩‍👧‍👦🏳️‍🌈", "مرحبا كيف حالك؟", "שלום עולם", "\u202eevil\u202c", "\uff26\uff55\uff4c\uff4c"]
        ),
        st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=31), min_size=1, max_size=20),
        st.just("\x00"),
        st.lists(st.sampled_from([*specials, "user", "assistant", "\n"]), min_size=1, max_size=12).map("".join),
        st.just("x" * max_chars),
    )


@dataclass(frozen=True)
class EdgeOutcome:
    prompt: str
    text: str | None
    error: str | None  # a documented, clear error (e.g. over-long prompt); crashes are raised, not stored


def survive(generate: Any, prompt: str, max_new_tokens: int) -> EdgeOutcome:
    """Generate for ``prompt``; a documented RuntimeBackendError is an acceptable outcome, anything else raises."""
    try:
        answer = generate(prompt, max_new_tokens=max_new_tokens)
    except RuntimeBackendError as exc:
        return EdgeOutcome(prompt, None, str(exc))
    answer.text.encode("utf-8")  # must be valid text
    return EdgeOutcome(prompt, answer.text, None)


def refuses(generate: Any, options: dict[str, Any]) -> str | None:
    """None when ``options`` are refused with a clear GenerationOptionsError, else what happened."""
    try:
        generate("Hello", **options)
    except GenerationOptionsError:
        return None
    except Exception as exc:  # the wrong kind of error is a finding, reported, not raised
        return f"{options}: raised {type(exc).__name__}: {exc}"
    return f"{options}: accepted"
