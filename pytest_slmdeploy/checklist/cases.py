"""Checklist item 1: domain answers, as case files (YAML or TOML) with expectations.

Expectations use promptfoo's vocabulary; each may be negated with a ``not-`` prefix::

    cases:
      - id: opening-hours
        prompt: What are your opening hours?
        expect:
          equals: We are open 9am to 5pm, Monday to Friday.
          not-contains: "<|im_end|>"
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_slmdeploy.errors import SlmDeployError, first_line
from pytest_slmdeploy.runtime import Generation

CASE_FIELDS = {"id", "prompt", "messages", "system", "max_tokens", "expect", "marks"}


class CaseFileError(SlmDeployError):
    """A case file has a mistake; the message names file, case and field."""


@dataclass(frozen=True)
class Expectation:
    kind: str
    value: Any
    negate: bool = False

    @property
    def label(self) -> str:
        return f"{'not-' if self.negate else ''}{self.kind}: {json.dumps(self.value, ensure_ascii=False)}"


@dataclass(frozen=True)
class Case:
    """One prompt (or conversation) and what its answer must satisfy."""

    id: str
    messages: tuple[Mapping[str, str], ...]
    expectations: tuple[Expectation, ...]
    max_tokens: int = 128
    source: str = ""

    @property
    def prompt_text(self) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)

    @property
    def expects_limit(self) -> bool:
        """The case declares that its answer runs to ``max_tokens`` (``finish-reason: length``)."""
        return any(e.kind == "finish-reason" and e.value == "length" and not e.negate for e in self.expectations)


@dataclass(frozen=True)
class CaseResult:
    """The answer and the expectations it missed; renders its own failure message."""

    case: Case
    generation: Generation
    missed: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return not self.missed

    def explain(self) -> str:
        lines = [
            f"case {self.case.id!r} ({self.case.source})",
            "prompt:",
            *[f"  {line}" for line in self.case.prompt_text.splitlines()],
            f"output ({self.generation.new_tokens} tokens, finish {self.generation.finish_reason}):",
            f"  {self.generation.text!r}",
            "missed:",
            *[f"  - {m}" for m in self.missed],
        ]
        return "\n".join(lines)


def _check_json(text: str, value: Any) -> str | None:
    try:
        data = json.loads(text)
    except ValueError as exc:
        return f"not JSON ({exc})"
    if isinstance(value, Mapping) and "schema" in value:
        import jsonschema

        try:
            jsonschema.validate(data, value["schema"])
        except jsonschema.ValidationError as exc:
            return f"JSON does not match the schema: {exc.message}"
    return None


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


# Each check returns None when the expectation holds, else a short reason.
_CHECKS: dict[str, Callable[[Generation, Any], str | None]] = {
    "equals": lambda g, v: None if g.text == str(v) else "text differs",
    "contains": lambda g, v: None if all(s in g.text for s in _as_list(v)) else "substring missing",
    "contains-all": lambda g, v: None if all(s in g.text for s in _as_list(v)) else "a substring is missing",
    "contains-any": lambda g, v: None if any(s in g.text for s in _as_list(v)) else "none of the substrings",
    "icontains": lambda g, v: None if str(v).lower() in g.text.lower() else "substring missing (any case)",
    "starts-with": lambda g, v: None if g.text.startswith(str(v)) else "different start",
    "regex": lambda g, v: None if re.search(str(v), g.text) else "no match",
    "is-json": lambda g, v: _check_json(g.text, v),
    "max-tokens": lambda g, v: None if g.new_tokens <= int(v) else f"{g.new_tokens} tokens",
    "finish-reason": lambda g, v: None if g.finish_reason == str(v) else f"finish {g.finish_reason}",
    "latency": lambda g, v: None if g.total_s * 1000 <= float(v) else f"{g.total_s * 1000:.0f} ms",
}
EXPECTATION_KINDS = tuple(sorted(_CHECKS))


def check_case(case: Case, generation: Generation) -> CaseResult:
    """Evaluate every expectation of ``case`` against ``generation``."""
    missed = []
    for expectation in case.expectations:
        reason = _CHECKS[expectation.kind](generation, expectation.value)
        holds = reason is None
        if holds == expectation.negate:
            why = "holds but must not" if expectation.negate else reason
            missed.append(f"{expectation.label} ({why})")
    return CaseResult(case, generation, tuple(missed))


def _expectations(raw: Any, where: str) -> tuple[Expectation, ...]:
    items: list[tuple[str, Any]]
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, list) and all(isinstance(i, Mapping) and len(i) == 1 for i in raw):
        items = [next(iter(i.items())) for i in raw]
    else:
        raise CaseFileError(f"{where}: field 'expect' must be a mapping or a list of one-key mappings")
    if not items:
        raise CaseFileError(f"{where}: field 'expect' is empty: give at least one expectation")
    found = []
    for key, value in items:
        negate = str(key).startswith("not-")
        kind = str(key).removeprefix("not-")
        if kind not in _CHECKS:
            raise CaseFileError(
                f"{where}: field 'expect' has unknown expectation {key!r}; use {', '.join(EXPECTATION_KINDS)} "
                "(each may start with 'not-')"
            )
        if kind == "regex":
            try:
                re.compile(str(value))
            except re.error as exc:
                raise CaseFileError(f"{where}: field 'expect.regex' is not a valid regex: {exc}") from None
        found.append(Expectation(kind, value, negate))
    return tuple(found)


def _messages(raw: Mapping[str, Any], where: str) -> tuple[Mapping[str, str], ...]:
    if ("prompt" in raw) == ("messages" in raw):
        raise CaseFileError(f"{where}: give exactly one of the fields 'prompt' or 'messages'")
    if "prompt" in raw:
        if not isinstance(raw["prompt"], str):
            raise CaseFileError(f"{where}: field 'prompt' must be a string")
        messages: list[Mapping[str, str]] = [{"role": "user", "content": raw["prompt"]}]
    else:
        messages = raw["messages"]
        valid = isinstance(messages, list) and all(
            isinstance(m, Mapping) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages
        )  # fmt: skip
        if not valid or not messages or messages[-1]["role"] != "user":
            raise CaseFileError(
                f"{where}: field 'messages' must be a list of {{role: system|user|assistant, content: text}} "
                "ending with a user message"
            )
    if "system" in raw:
        if not isinstance(raw["system"], str):
            raise CaseFileError(f"{where}: field 'system' must be a string")
        messages = [{"role": "system", "content": raw["system"]}, *messages]
    return tuple(dict(m) for m in messages)


def parse_cases(data: Any, source: str) -> list[Case]:
    """Cases from a loaded case file (``{defaults?, cases: [...]}``)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("cases"), list):
        raise CaseFileError(f"{source}: expected a top-level 'cases' list")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise CaseFileError(f"{source}: 'defaults' must be a mapping")
    cases, seen = [], set()
    for index, raw_case in enumerate(data["cases"]):
        if not isinstance(raw_case, Mapping):
            raise CaseFileError(f"{source}: case {index}: must be a mapping")
        raw = {**defaults, **raw_case}
        case_id = str(raw.get("id") or (raw.get("prompt") if isinstance(raw.get("prompt"), str) else index))
        where = f"{source}: case {case_id!r}"
        unknown = sorted(set(raw) - CASE_FIELDS)
        if unknown:
            raise CaseFileError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(sorted(CASE_FIELDS))}")
        if case_id in seen:
            raise CaseFileError(f"{where}: field 'id' repeats an earlier case; ids must be unique in a file")
        seen.add(case_id)
        max_tokens = raw.get("max_tokens", 128)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise CaseFileError(f"{where}: field 'max_tokens' must be a whole number of at least 1")
        if "expect" not in raw:
            raise CaseFileError(f"{where}: field 'expect' is missing: what must the answer satisfy?")
        cases.append(Case(case_id, _messages(raw, where), _expectations(raw["expect"], where), max_tokens, source))
    return cases


def load_case_file(path: Path) -> list[Case]:
    """Read a ``.yaml``/``.yml`` or ``.toml`` case file."""
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseFileError(f"{path}: cannot be read ({exc})") from None
    except Exception as exc:  # yaml.YAMLError / tomllib.TOMLDecodeError: a syntax error in the file
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:  # PyYAML: say where, in one line
            first = f"{getattr(exc, 'problem', None) or exc} (line {mark.line + 1}, column {mark.column + 1})"
        else:
            first = first_line(str(exc)) or type(exc).__name__
        raise CaseFileError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {first}") from None
    return parse_cases(data, str(path))
