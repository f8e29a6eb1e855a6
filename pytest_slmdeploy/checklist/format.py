"""Checklist item 2: the answer's format: it stops, leaks no special tokens, is clean text, does not loop."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_slmdeploy.runtime import Generation
from pytest_slmdeploy.stats import Verdict, wilson_interval
from pytest_slmdeploy.template import FIXED_DATE, derive_prompt_template, fill_prompt_template, render_chat

# Prompts any chat model should answer and end by itself (used with the domain prompts).
GENERIC_PROMPTS = ("Hello", "What can you help me with?", "Answer in one sentence: what do you do?")
# Prompts that ask for a short answer: with GENERIC_PROMPTS, 60 answers, enough that a model stopping every time
# (or all but once) is a decided pass of a 90% stop rate on its own (Wilson's 95% interval; 35 could not
# survive one miss, 15 could not decide at all). SmolLM2-135M-Instruct ends each of them within 66 tokens, and
# a toy model trained on anything ends them too; none is a fidelity or calibration prompt.
STOP_PROMPTS = (
    "Good morning!",
    "Give one word that rhymes with 'hat'.",
    "Please say 'ready' and nothing else.",
    "Repeat after me: the quick brown fox.",
    "Write a three-word slogan for a bakery.",
    "How many days are in a week? Number only.",
    "How many legs does a dog have? Reply with the number only.",
    "In one word, what color is grass?",
    "What is 2 plus 2? Reply with the number only.",
    "What is the capital of Italy? One word.",
    "What is the capital of Spain? One word.",
    "What is the opposite of hot? One word.",
    "What is the opposite of up? One word.",
    "What shape has three sides? One word.",
    "What is 10 minus 3? Reply with the number only.",
    "What is 5 times 6? Reply with the number only.",
    "What is half of ten? Number only.",
    "What is the plural of mouse? One word.",
    "What time of day is breakfast eaten? Briefly.",
    "Are you ready to help? Answer briefly.",
    "Complete the phrase: once upon a ...",
    "Which is bigger, an elephant or a mouse? One word.",
    "What do bees make? One word.",
    "List three colors, separated by commas.",
    "Answer in one short sentence: what is a cat?",
    "Name a day of the week.",
    "Name one ocean.",
    "Thank you!",
    "Translate 'cat' into German. One word.",
    "Give me a synonym for happy. One word.",
    "Say hello in French. One word.",
    "In one sentence, what is the moon?",
    "Name a month of the year.",
    "Give a one-sentence greeting for a customer.",
    "What is frozen water called? One word.",
    "In one sentence, what is a teacher?",
    "Is it day or night when the sun is up? One word.",
    "What do you call a baby dog? One word.",
    "In one sentence, what is a book?",
    "What sound does a cow make? One word.",
    "What is H2O commonly called? One word.",
    "What letter comes after B?",
    "Name one fruit that is yellow.",
    "Write a one-line apology for a late reply.",
    "Answer yes or no: is water wet?",
    "Reply with OK.",
    "Answer yes or no: can fish fly?",
    "Is a tomato a fruit? Answer yes or no.",
    "Count from one to five.",
    "Name one primary color.",
    "Which season comes after winter? One word.",
    "Spell the word cat backwards.",
    "Answer in one short sentence: what is rain?",
    "Goodbye!",
    "In one word, what color is the sky on a clear day?",
    "Reply with one word: is the sun a star?",
    "Can you hear me?",
)


@dataclass(frozen=True)
class SpecialTokens:
    """The tokens a tokenizer treats as special or added (template and control tokens)."""

    texts: frozenset[str]
    ids: frozenset[int]

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> SpecialTokens:
        texts: set[str] = set()
        ids: set[int] = set()
        tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        for token in tokenizer.get("added_tokens", []):
            if token.get("special", True):
                texts.add(str(token["content"]))
                ids.add(int(token["id"]))
        config_path = model_dir / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = config.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and value:
                    texts.add(value)
        return cls(frozenset(t for t in texts if t.strip()), frozenset(ids))


def leaked_tokens(generation: Generation, special: SpecialTokens) -> list[str]:
    """Special/template tokens in the answer: as text, or as ids where the backend gives them."""
    found = sorted(t for t in special.texts if t in generation.text)
    found += [f"token id {i}" for i in generation.token_ids if i in special.ids]
    return found


def repeated_tail(text: str, *, min_repeats: int = 4, max_unit: int = 40) -> str | None:
    """A unit of text that repeats back to back at the end of the answer ``min_repeats`` times or more."""
    for size in range(1, min(max_unit, len(text) // min_repeats) + 1):
        unit = text[-size:]
        if unit.strip() and text.endswith(unit * min_repeats):
            return unit
    return None


@dataclass(frozen=True)
class FormatResult:
    """Format problems of one answer; renders its own message."""

    prompt: str
    generation: Generation
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems

    def explain(self) -> str:
        return f"prompt {self.prompt!r} -> {self.generation.text!r}: " + "; ".join(self.problems)


def check_format(prompt: str, generation: Generation, special: SpecialTokens, *, require_stop: bool) -> FormatResult:
    problems = []
    if require_stop and generation.finish_reason != "stop":
        problems.append(f"did not stop by itself (hit the limit of {generation.new_tokens} new tokens)")
    leaked = leaked_tokens(generation, special)
    if leaked:
        problems.append(f"special/template tokens in the answer: {', '.join(leaked)}")
    if not generation.text.strip():
        problems.append("empty answer")
    if "\ufffd" in generation.text:
        problems.append("invalid UTF-8 (replacement characters) in the answer")
    loop = repeated_tail(generation.text)
    if loop is not None:
        problems.append(f"runaway repetition of {loop!r}")
    return FormatResult(prompt, generation, tuple(problems))


def stop_rate(results: Sequence[FormatResult]) -> float:
    return sum(r.generation.finish_reason == "stop" for r in results) / len(results) if results else 0.0


@dataclass(frozen=True)
class StopRate:
    """How many answers ended by themselves, judged against a minimum share on the 95% interval of that share:
    *pass* when the interval lies at or above the limit, *fail* when it lies below, *inconclusive* when it
    straddles it (too few answers to tell). A limit of 1 claims that every answer stops: any miss fails, and
    only then is every answer asked the whole claim."""

    results: tuple[FormatResult, ...]
    limit: float

    @property
    def stopped(self) -> int:
        return sum(r.generation.finish_reason == "stop" for r in self.results)

    @property
    def answers(self) -> int:
        return len(self.results)

    @property
    def rate(self) -> float:
        return stop_rate(self.results)

    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.rate, self.answers)

    @property
    def verdict(self) -> Verdict:
        if self.limit <= 0:
            return "pass"
        if self.limit >= 1:
            return (
                "pass" if self.answers and self.stopped == self.answers else "fail" if self.answers else "inconclusive"
            )
        low, high = self.interval()
        return "pass" if low >= self.limit else "fail" if high < self.limit else "inconclusive"

    def figure(self) -> str:
        low, high = self.interval()
        return f"{self.stopped}/{self.answers} (95% interval {low:.0%}-{high:.0%})"

    def explain(self) -> str:
        misses = [r for r in self.results if r.generation.finish_reason != "stop"]
        shown = "; ".join(f"{r.prompt!r} -> {r.generation.text[:60]!r}" for r in misses[:5])
        more = f" (and {len(misses) - 5} more)" if len(misses) > 5 else ""
        if self.limit >= 1:
            told = f"{len(misses)} of {self.answers} did not stop; the limit 100% claims every answer"
            return f"stop rate {self.stopped}/{self.answers}: {told}" + (f": {shown}{more}" if misses else "")
        what = {
            "fail": "below",
            "inconclusive": "too few answers to tell it from",
            "pass": "at or above",
        }[self.verdict]
        return f"stop rate {self.figure()} {what} the limit {self.limit:.0%}" + (
            f"; did not stop: {shown}{more}" if misses else ""
        )


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# The conversations a PromptTemplate is checked on, by the parts each needs beyond ``prompt``.
TEMPLATE_CONVERSATIONS: dict[str, tuple[tuple[str, ...], list[dict[str, str]]]] = {
    "user only": ((), [_user("Hello there")]),
    "system + user": (("system",), [{"role": "system", "content": "You are a support assistant."}, _user("Hello")]),
    "multi-turn": (
        ("user", "assistant"),
        [_user("First question?"), {"role": "assistant", "content": "First answer."}, _user("Second question?")],
    ),
    "system + multi-turn": (
        ("system", "user", "assistant"),
        [
            {"role": "system", "content": "Be brief."},
            _user("First question?"),
            {"role": "assistant", "content": "First answer."},
            _user("Second question?"),
        ],
    ),
}


def template_conversations(parts: Mapping[str, str]) -> dict[str, list[dict[str, str]]]:
    """The conversations this PromptTemplate can express (a template without a system role has no system part)."""
    return {name: messages for name, (needs, messages) in TEMPLATE_CONVERSATIONS.items() if set(needs) <= set(parts)}


def _first_difference(ours: Sequence[int], theirs: Sequence[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    return f"{len(ours)} vs {len(theirs)} tokens, first difference at token {at}"


def missing_parts(parts: Mapping[str, str], chat_template: str, tokenizer_config: Mapping[str, object]) -> list[str]:
    """The parts the chat template's own PromptTemplate has and ``parts`` lacks: the conversations that need them
    cannot be expressed, and the check below would skip them instead of failing."""
    derived = derive_prompt_template(chat_template, tokenizer_config).parts
    found = []
    for part in sorted(set(derived) - set(parts)):
        lost = [name for name, (needs, _) in TEMPLATE_CONVERSATIONS.items() if part in needs or part == "prompt"]
        found.append(f"PromptTemplate has no {part!r} part, which the chat template's has: {', '.join(lost)} "
                     "conversations cannot be expressed")  # fmt: skip
    return found


def prompt_template_mismatches(
    parts: Mapping[str, str],
    chat_template: str,
    tokenizer_config: Mapping[str, object],
    render: Callable[[list[Mapping[str, str]]], str],
    encode: Callable[[str], list[int]],
) -> list[str]:
    """Where PromptTemplate gives other prompt tokens than the model's own chat template, and where the
    runtime renders the chat template otherwise than transformers does.

    PromptTemplate is compared at its fixed date (a dated header is written once); the runtime at today's.
    """
    mismatches = missing_parts(parts, chat_template, tokenizer_config)
    for name, messages in template_conversations(parts).items():
        ours = encode(fill_prompt_template(parts, messages))
        expected = render_chat(
            chat_template, messages, add_generation_prompt=True, tokenizer_config=tokenizer_config, today=FIXED_DATE
        )
        theirs = encode(expected)
        if ours != theirs:
            mismatches.append(f"{name}: PromptTemplate vs chat template, {_first_difference(ours, theirs)}")
        today = render_chat(chat_template, messages, add_generation_prompt=True, tokenizer_config=tokenizer_config)
        runtime = render(list(messages))
        if runtime != today:
            mismatches.append(
                f"{name}: the runtime renders the chat template otherwise than transformers: {runtime!r} vs {today!r}"
            )
    return mismatches
