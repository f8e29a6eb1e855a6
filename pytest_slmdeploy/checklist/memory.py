"""Checklist item 3: no memory leaks in prolonged use (RSS trend after warm-up, robust to noise)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from statistics import median

from pytest_slmdeploy.measure import rss_bytes


def theil_sen_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The median of pairwise slopes: one noisy sample (an arena step) cannot make a trend."""
    slopes = [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in combinations(zip(xs, ys, strict=True), 2) if x2 != x1]
    return median(slopes) if slopes else 0.0


@dataclass(frozen=True)
class SoakResult:
    """RSS after each step of a soak; the leak rate is the robust slope."""

    what: str
    rss: tuple[int, ...]
    seconds: float
    per: str = "generation"

    @property
    def steps(self) -> int:
        return len(self.rss)

    @property
    def bytes_per_step(self) -> float:
        return theil_sen_slope(range(len(self.rss)), self.rss)

    @property
    def mb_per_1k(self) -> float:
        return self.bytes_per_step * 1000 / 1e6

    @property
    def growth_mb(self) -> float:
        return (self.rss[-1] - self.rss[0]) / 1e6 if self.rss else 0.0

    def explain(self, limit_mb_per_1k: float) -> str:
        return (
            f"{self.what}: RSS grows {self.mb_per_1k:.2f} MB per 1,000 {self.per}s (limit {limit_mb_per_1k:g}); "
            f"{self.steps} {self.per}s in {self.seconds:.1f}s, {self.rss[0] / 1e6:.1f} -> {self.rss[-1] / 1e6:.1f} MB"
        )


def soak(
    step: Callable[[int], object],
    *,
    steps: int,
    warmup: int,
    time_budget_s: float,
    what: str = "soak",
    per: str = "generation",
) -> SoakResult:
    """Run ``step(i)`` ``warmup`` times, then up to ``steps`` times (or until the budget), sampling RSS."""
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    samples = [rss_bytes()]
    for i in range(steps):
        step(warmup + i)
        samples.append(rss_bytes())
        if time.perf_counter() - start > time_budget_s and len(samples) >= 10:
            break
    return SoakResult(what, tuple(samples), time.perf_counter() - start, per)
