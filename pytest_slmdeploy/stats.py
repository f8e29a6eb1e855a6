"""Timing verdicts that noise cannot fake: interleaved rounds, medians, a paired bootstrap interval.

A verdict about time compares two conditions measured in the same run, A and B
(a short and a long prompt, a bare loop and the plugin's), one round of each
after the other so a change in machine load hits both alike. The claim checked
is ``median(B) <= factor * median(A) + slack``. The paired bootstrap resamples
whole rounds and gives an interval for the excess ``median(B) - (factor *
median(A) + slack)``: entirely at or below zero passes, entirely above fails,
and an interval that straddles zero is *inconclusive*: the spread seen in this
run is too wide to decide, and the check says so instead of guessing.

A bootstrap over a handful of rounds has few distinct resamples (10 for 3
rounds) and cannot by itself support a 95% claim, so a decision also needs an
exact sign test on the rounds' own excesses: at least 6 rounds, all on the
decided side (one-sided p <= 2.5%), 8 of 9, and so on. Fewer is inconclusive,
and the interleaved loop goes on measuring while rounds and time remain.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median
from typing import Literal, Protocol, TypeVar

Verdict = Literal["pass", "fail", "inconclusive"]
CONFIDENCE = 0.95
RESAMPLES = 2000
ALPHA = (1 - CONFIDENCE) / 2  # one-sided: a decision claims one direction
Z = 1.959964  # a two-sided 95% interval: each decision, pass or fail, at 2.5% (ALPHA)


def wilson_interval(share: float, n: float, z: float = Z) -> tuple[float, float]:
    """Wilson's 95% interval of a proportion ``share`` observed on ``n`` independent trials (``n`` may be an
    effective, fractional count). Unlike the normal interval it stays inside [0, 1] and is not empty at 0% or
    100%. With no trials it is [0, 1]: nothing is known."""
    if n <= 0:
        return 0.0, 1.0
    centre = share + z * z / (2 * n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)


def sign_test_p(successes: int, rounds: int) -> float:
    """One-sided exact sign test: the chance of at least ``successes`` of ``rounds`` fair coin flips."""
    return float(sum(math.comb(rounds, k) for k in range(successes, rounds + 1))) / 2.0**rounds


T = TypeVar("T")


@dataclass(frozen=True)
class Comparison:
    """The decision on ``median(B) <= factor * median(A) + slack`` and the evidence for it."""

    what: str
    a: tuple[float, ...]
    b: tuple[float, ...]
    factor: float
    slack: float
    excess_low: float  # bootstrap interval of median(B) - (factor * median(A) + slack)
    excess_high: float
    unit: str = "s"

    @property
    def rounds(self) -> int:
        return len(self.a)

    @property
    def excesses(self) -> tuple[float, ...]:
        """Each round's own excess: B - (factor x A + slack) of the same round."""
        return tuple(b - (self.factor * a + self.slack) for a, b in zip(self.a, self.b, strict=True))

    def _sign_p(self, over: bool) -> float:
        side = sum((e > 0) if over else (e <= 0) for e in self.excesses)
        return sign_test_p(side, self.rounds)

    @property
    def verdict(self) -> Verdict:
        if self.excess_high <= 0 and self._sign_p(over=False) <= ALPHA:
            return "pass"
        if self.excess_low > 0 and self._sign_p(over=True) <= ALPHA:
            return "fail"
        return "inconclusive"

    @property
    def spread(self) -> float:
        """Width of the interval relative to the allowed value (how noisy this run was)."""
        allowed = self.allowed
        return (self.excess_high - self.excess_low) / allowed if allowed else float("inf")

    @property
    def allowed(self) -> float:
        return self.factor * median(self.a) + self.slack

    def explain(self) -> str:
        b, allowed = median(self.b), self.allowed
        head = (
            f"{self.what}: {_fmt(b, self.unit)} vs allowed {_fmt(allowed, self.unit)} "
            f"({self.factor:.3g} x {_fmt(median(self.a), self.unit)}"
            + (f" + {_fmt(self.slack, self.unit)}" if self.slack else "")
            + f"), {self.rounds} interleaved rounds"
        )
        interval = f"excess {_fmt(self.excess_low, self.unit)}..{_fmt(self.excess_high, self.unit)}"
        if self.verdict == "inconclusive":
            if self.excess_low > 0 or self.excess_high <= 0:  # the interval decides, the rounds do not yet
                over = self.excess_low > 0
                side = sum((e > 0) if over else (e <= 0) for e in self.excesses)
                return (
                    f"inconclusive: {head}; {interval}, but {side} of {self.rounds} rounds "
                    f"{'over' if over else 'within'} the allowed value: sign test p = {self._sign_p(over):.3g} "
                    f"> {ALPHA:g}"
                )
            return f"inconclusive: {head}; {interval} straddles 0 (spread {self.spread:.0%} of the allowed value)"
        return f"{self.verdict}: {head}; {interval}"


def _fmt(seconds: float, unit: str) -> str:
    if unit != "s":
        return f"{seconds:.4g} {unit}"
    if abs(seconds) >= 1:
        return f"{seconds:.3g} s"
    if abs(seconds) >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    factor: float = 1.0,
    slack: float = 0.0,
    what: str = "B vs A",
    unit: str = "s",
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """Decide ``median(b) <= factor * median(a) + slack`` from paired (interleaved) rounds."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same number of rounds of both conditions, got {len(a)} and {len(b)}")
    rng = random.Random(seed)
    n = len(a)
    excesses = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        excesses.append(median(b[i] for i in idx) - (factor * median(a[i] for i in idx) + slack))
    excesses.sort()
    tail = (1 - confidence) / 2
    low = excesses[int(tail * (resamples - 1))]
    high = excesses[int((1 - tail) * (resamples - 1))]
    return Comparison(what, tuple(a), tuple(b), factor, slack, low, high, unit)


def median_interval(
    values: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of the median of ``values`` (with three rounds: about their range)."""
    if not values:
        raise ValueError("no values")
    rng = random.Random(seed)
    n = len(values)
    medians = sorted(median(values[rng.randrange(n)] for _ in range(n)) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return medians[int(tail * (resamples - 1))], medians[int((1 - tail) * (resamples - 1))]


def relative_width(values: Sequence[float]) -> float:
    """Width of the median's interval as a share of the median (0.04: the interval spans 4% of it)."""
    low, high = median_interval(values)
    mid = median(values)
    return (high - low) / abs(mid) if mid else float("inf")


def interleaved(
    conditions: Sequence[Callable[[], T]],
    *,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    decided: Callable[[list[list[T]]], bool] | None = None,
) -> list[list[T]]:
    """Run one measurement of each condition per round (A, B, C, A, B, C, ...).

    Stops after ``max_rounds``, or once past ``min_rounds`` when ``decided(samples)`` says the
    verdict is settled or the time budget is spent. Returns one list of samples per condition.
    """
    samples: list[list[T]] = [[] for _ in conditions]
    start = time.perf_counter()
    for round_ in range(max_rounds):
        for i, measure in enumerate(conditions):
            samples[i].append(measure())
        if round_ + 1 >= min_rounds and (
            time.perf_counter() - start > budget_s or (decided is not None and decided(samples))
        ):
            break
    return samples


class Judged(Protocol):
    """Anything judged pass/fail/inconclusive that explains itself (a :class:`Comparison`, a memory soak)."""

    @property
    def verdict(self) -> Verdict: ...

    def explain(self) -> str: ...


@dataclass(frozen=True)
class Verdicts:
    """Several comparisons read together: what failed, what this run's noise left undecided."""

    failed: tuple[str, ...]
    inconclusive: tuple[str, ...]

    @classmethod
    def of(cls, comparisons: Sequence[Judged]) -> Verdicts:
        return cls(
            tuple(c.explain() for c in comparisons if c.verdict == "fail"),
            tuple(c.explain() for c in comparisons if c.verdict == "inconclusive"),
        )
