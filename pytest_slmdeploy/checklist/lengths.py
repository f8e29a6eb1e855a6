"""Checklist item 4: consistent behaviour across input lengths, up to the model's context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median

from pytest_slmdeploy.runtime import Generation

FILLER = "The quick brown fox jumps over the lazy dog. "


@dataclass(frozen=True)
class LengthPoint:
    """Median figures of a few generations at one prompt length."""

    prompt_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    finish_reasons: tuple[str, ...]


def prompt_of_tokens(target: int, count_tokens: Callable[[str], int], filler: str = FILLER) -> str:
    """A user prompt whose *rendered* length is close to (at most) ``target`` tokens."""
    words = filler.split()
    text, best = "", ""
    i = 0
    while True:
        candidate = (text + " " + words[i % len(words)]).strip()
        if count_tokens(candidate) > target:
            return best or candidate
        text = best = candidate
        i += 1


def sweep_lengths(context_length: int, *, max_tokens: int, points: int = 4, reserve: int = 16) -> list[int]:
    """Prompt lengths from a few tokens up to the context (less ``reserve`` for the answer), geometric."""
    top = max(8, min(max_tokens, context_length - reserve))
    low = min(16, top)
    if points <= 1 or top == low:
        return [top]
    ratio = (top / low) ** (1 / (points - 1))
    return sorted({round(low * ratio**i) for i in range(points)})


def measure(generate: Callable[[str], Generation], prompt: str, repeats: int) -> LengthPoint:
    runs = [generate(prompt) for _ in range(repeats)]
    return LengthPoint(
        prompt_tokens=runs[0].prompt_tokens,
        ttft_s=median(r.ttft_s for r in runs),
        decode_tokens_per_s=median(r.decode_tokens_per_s for r in runs),
        finish_reasons=tuple(r.finish_reason for r in runs),
    )


@dataclass(frozen=True)
class LengthVerdict:
    points: tuple[LengthPoint, ...]
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


def judge(
    points: Sequence[LengthPoint],
    *,
    ttft_tolerance: float,
    ttft_slack_s: float,
    decode_band: float,
    decode_slack_s: float = 0.0,
) -> LengthVerdict:
    """TTFT may grow at most linearly with prompt length (times 1 + tolerance, plus a noise slack);
    decode tokens/s at the longest prompt stays within ``decode_band`` of the shortest (the time per
    token may also exceed that by ``decode_slack_s``: tiny models decode in microseconds, where
    timer and scheduler noise dominate)."""
    problems = []
    first = points[0]
    for point in points[1:]:
        allowed = first.ttft_s * (point.prompt_tokens / first.prompt_tokens) * (1 + ttft_tolerance) + ttft_slack_s
        if point.ttft_s > allowed:
            problems.append(
                f"TTFT at {point.prompt_tokens} tokens is {point.ttft_s * 1000:.1f} ms, more than linear growth "
                f"from {first.prompt_tokens} tokens allows ({allowed * 1000:.1f} ms)"
            )
    last = points[-1]
    if first.decode_tokens_per_s > 0 and last.decode_tokens_per_s > 0:
        allowed_s = 1 / (first.decode_tokens_per_s * (1 - decode_band)) + decode_slack_s
        slow = 1 / last.decode_tokens_per_s > allowed_s
    else:
        slow = False
    if slow:
        problems.append(
            f"decode falls from {first.decode_tokens_per_s:.1f} tok/s at {first.prompt_tokens} tokens to "
            f"{last.decode_tokens_per_s:.1f} at {last.prompt_tokens} (band {decode_band:.0%})"
        )
    return LengthVerdict(tuple(points), tuple(problems))
