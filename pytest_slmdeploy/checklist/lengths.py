"""Checklist item 4: consistent behaviour across input lengths, up to the model's context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from statistics import median

from pytest_slmdeploy.runtime import Generation
from pytest_slmdeploy.stats import Comparison, compare

FILLER = "The quick brown fox jumps over the lazy dog. "


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


def sweep_lengths(
    context_length: int, *, max_tokens: int, points: int = 4, reserve: int = 16, anchors: Sequence[int] = ()
) -> list[int]:
    """Prompt lengths from a few tokens up to the context (less ``reserve`` for the answer), geometric.

    An inner point within half a step (geometrically) of one of ``anchors`` moves onto it: the benchmarks'
    lengths, so that the sweep's rounds are also the benchmarks' (the same request, measured once)."""
    top = max(8, min(max_tokens, context_length - reserve))
    low = min(16, top)
    if points <= 1 or top == low:
        return [top]
    ratio = (top / low) ** (1 / (points - 1))
    grid = [round(low * ratio**i) for i in range(points)]
    free = sorted({a for a in anchors if low < a < top})
    for i, point in enumerate(grid[1:-1], start=1):
        near = [a for a in free if max(a, point) / min(a, point) <= ratio**0.5]
        if near:
            grid[i] = min(near, key=lambda a: max(a, point) / min(a, point))
            free.remove(grid[i])
    return sorted(set(grid))


def answer_problems(answers: Sequence[Generation]) -> list[str]:
    """Every length must give a non-empty answer that stops or reaches the token limit, as short prompts do."""
    problems = []
    for answer in answers:
        if not answer.text.strip():
            problems.append(f"empty answer at {answer.prompt_tokens} prompt tokens ({answer.finish_reason})")
        elif answer.finish_reason not in ("stop", "length"):
            problems.append(f"unknown finish reason {answer.finish_reason!r} at {answer.prompt_tokens} tokens")
    return problems


def per_token_s(generation: Generation) -> float:
    """Seconds per decoded token after the first (0 when nothing was decoded): the median step where the backend
    times each step. A step the scheduler preempted takes a whole time slice; a long prompt's round lasts longer
    and collects more of them, so under load the mean step grew with the prompt on a healthy model (the tiny
    Gemma 2 model: 912 us against 46 us with two other builds running, issue 21, item 0). A model that really
    slows with the context slows every step, and the median shows it."""
    if generation.step_s:
        return median(generation.step_s)
    rate = generation.decode_tokens_per_s
    return 1 / rate if rate else 0.0


def compare_lengths(
    runs: Sequence[Sequence[Generation]],
    *,
    ttft_tolerance: float,
    ttft_slack_s: float,
    decode_band: float,
    decode_slack_s: float,
) -> list[Comparison]:
    """Each length against the shortest, from interleaved rounds (``runs[i]`` = the rounds of length i).

    TTFT may grow at most linearly with the prompt (times ``1 + ttft_tolerance``, plus ``ttft_slack_s``);
    the time per decoded token may grow by at most ``1 / (1 - decode_band)`` (plus ``decode_slack_s``:
    tiny models decode in microseconds, where the scheduler's noise is larger than any real effect).
    """
    first = runs[0]
    tokens0 = first[0].prompt_tokens
    found = []
    for rounds in runs[1:]:
        tokens = rounds[0].prompt_tokens
        found.append(
            compare(
                [g.ttft_s for g in first], [g.ttft_s for g in rounds],
                factor=(tokens / tokens0) * (1 + ttft_tolerance), slack=ttft_slack_s,
                what=f"TTFT at {tokens} vs {tokens0} prompt tokens",
            )
        )  # fmt: skip
        found.append(
            compare(
                [per_token_s(g) for g in first], [per_token_s(g) for g in rounds],
                factor=1 / (1 - decode_band), slack=decode_slack_s,
                what=f"time per decoded token at {tokens} vs {tokens0} prompt tokens",
            )
        )  # fmt: skip
    return found
