"""Checklist item 5: edge cases and invalid input, judged at the runtime, not at the plugin's front door.

Every unusual prompt that fits the context must get an answer (the only accepted
refusal is :class:`ContextOverflowError` for a prompt over the context), and
sampling settings must reach the runtime: a seed repeats its answer, and
different seeds at a high temperature do not all give the greedy answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_slmdeploy.errors import (
    ContextOverflowError,
    EmptyPromptError,
    RuntimeBackendError,
    describe,
)
from pytest_slmdeploy.runtime import Generation


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
    """What one unusual prompt got: an answer, the documented over-context refusal, or a problem."""

    prompt: str
    text: str | None = None
    refused: str | None = None  # ContextOverflowError or EmptyPromptError: documented, acceptable
    problem: str | None = None  # anything else: a crash, a refusal of a prompt that fits, broken text

    @property
    def passed(self) -> bool:
        return self.problem is None


def survive(generate: Callable[..., Generation], prompt: str, max_new_tokens: int) -> EdgeOutcome:
    """Generate for ``prompt`` and classify the outcome; never raises for what the model does."""
    try:
        answer = generate(prompt, max_new_tokens=max_new_tokens)
    except (ContextOverflowError, EmptyPromptError) as exc:
        return EdgeOutcome(prompt, refused=str(exc))
    except RuntimeBackendError as exc:
        return EdgeOutcome(prompt, problem=f"refused a prompt that fits the context: {exc}")
    except Exception as exc:  # a crash in the runtime or template is the finding itself
        return EdgeOutcome(prompt, problem=f"crashed: {describe(exc)}")
    if answer.finish_reason not in ("stop", "length"):
        return EdgeOutcome(prompt, answer.text, problem=f"unknown finish reason {answer.finish_reason!r}")
    try:
        answer.text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: the runtime produced text that is not text
        return EdgeOutcome(prompt, answer.text, problem=f"answer is not valid text: {exc.reason}")
    return EdgeOutcome(prompt, answer.text)


def explain_problems(outcomes: Sequence[EdgeOutcome], limit: int = 5) -> str:
    bad = [o for o in outcomes if not o.passed]
    lines = [f"prompt {o.prompt[:60]!r}: {o.problem}" for o in bad[:limit]]
    more = f"\n... and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} of {len(outcomes)} unusual prompts were not handled:\n" + "\n".join(lines) + more


@dataclass(frozen=True)
class SamplingCheck:
    """Whether sampling settings reached the runtime, with the answers that show it."""

    greedy: str
    same_seed: tuple[str, str]
    by_seed: tuple[str, ...]
    narrowed: tuple[tuple[str, str], ...] = ()  # (setting, answer) sampled hot with top_k=1 or a tiny top_p

    @property
    def problems(self) -> tuple[str, ...]:
        found = []
        if self.same_seed[0] != self.same_seed[1]:
            found.append(f"the same seed gave different answers: {self.same_seed[0]!r} vs {self.same_seed[1]!r}")
        if all(text == self.greedy for text in self.by_seed):
            found.append(
                f"{len(self.by_seed)} sampled answers (high temperature, different seeds) all equal the greedy "
                f"answer {self.greedy!r}: sampling settings do not reach the runtime"
            )
        elif len(self.by_seed) > 1 and len(set(self.by_seed)) == 1:
            found.append(
                f"{len(self.by_seed)} seeds at a high temperature all gave {self.by_seed[0]!r}: the seed does not "
                "reach the runtime"
            )
        for setting, text in self.narrowed:
            if text != self.greedy:
                found.append(
                    f"sampled with {setting} at a high temperature, the answer {text!r} is not the greedy "
                    f"{self.greedy!r}: {setting.split('=')[0]} does not reach the runtime"
                )
        return tuple(found)


def check_sampling(
    generate: Callable[..., Generation],
    prompt: str,
    *,
    max_new_tokens: int = 16,
    temperature: float = 5.0,
    seeds: Sequence[int] = tuple(range(1, 25)),
) -> SamplingCheck:
    """Greedy once; one seed twice; then seeds at a high temperature until one answer differs from greedy and
    two seeds differ from each other; then hot sampling narrowed to the top token by ``top_k=1`` and by a tiny
    ``top_p``, which must give the greedy answer.

    A high temperature flattens any trained answer, so a healthy runtime differs at the first seed or
    two; only a runtime that drops the settings gives the greedy answer for every seed, and one that drops the
    seed gives every seed the same answer. Where the runtime caps the temperature lower (Foundry Local: 2.0),
    more seeds make up for it.
    """

    def sample(seed: int, top_p: float = 1.0, top_k: int = 50) -> str:
        options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
        return generate(prompt, max_new_tokens=max_new_tokens, **options).text

    greedy = generate(prompt, max_new_tokens=max_new_tokens).text
    same_seed = (sample(seeds[0]), sample(seeds[0]))
    by_seed = [same_seed[0]]
    for seed in seeds[1:]:
        if any(text != greedy for text in by_seed) and len(set(by_seed)) > 1:
            break
        by_seed.append(sample(seed))
    narrowed = (("top_k=1", sample(seeds[0], top_k=1)), ("top_p=1e-6", sample(seeds[0], top_p=1e-6)))
    return SamplingCheck(greedy, same_seed, tuple(by_seed), narrowed)
