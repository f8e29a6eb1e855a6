"""Checklist item 3: no memory leaks in prolonged use (RSS trend after warm-up, robust to noise)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise
from statistics import NormalDist, median

from pytest_slmdeploy.measure import rss_bytes
from pytest_slmdeploy.stats import CONFIDENCE, Verdict


def _slopes(xs: Sequence[float], ys: Sequence[float]) -> list[float]:
    return [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in combinations(zip(xs, ys, strict=True), 2) if x2 != x1]


def theil_sen_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The median of pairwise slopes: one noisy sample (an arena step) cannot make a trend."""
    slopes = _slopes(xs, ys)
    return median(slopes) if slopes else 0.0


def theil_sen_interval(ys: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Sen's distribution-free confidence interval of the slope of ``ys`` over 0, 1, 2, ...: order statistics
    of the pairwise slopes, placed by the variance of Kendall's S (the no-ties variance: wider with ties)."""
    n = len(ys)
    slopes = sorted(_slopes(range(n), ys))
    if not slopes:
        return (-math.inf, math.inf)
    c = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    low, high = math.floor((len(slopes) - c) / 2), math.ceil((len(slopes) + c) / 2)
    if low < 0 or high >= len(slopes):
        return (-math.inf, math.inf)  # too few samples for an interval at this confidence
    return slopes[low], slopes[high]


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

    def quarters_mb(self) -> tuple[float, ...]:
        """Median RSS (MB) of each quarter of the samples, in order."""
        n = len(self.rss)
        parts = [self.rss[i * n // 4 : (i + 1) * n // 4] for i in range(4)]
        return tuple(median(part) / 1e6 for part in parts if part)

    def verdict(self, limit_bytes_per_step: float) -> Verdict:
        """pass: the robust slope is within the limit. fail: it is over, and RSS rose from each quarter of the
        soak to the next (by at least half the growth allowed over a quarter): a leak grows steadily, and one
        rise, however placed, lifts at most two of the three steps. inconclusive: over the limit without a
        steady rise (an allocator arena growing once, or noise)."""
        if self.bytes_per_step <= limit_bytes_per_step:
            return "pass"
        quarters = self.quarters_mb()
        allowed_mb = limit_bytes_per_step * (len(self.rss) / 4) / 1e6
        rises = [later - earlier for earlier, later in pairwise(quarters)]
        return "fail" if len(rises) == 3 and min(rises) > allowed_mb / 2 else "inconclusive"

    def settled(self, limit_bytes_per_step: float) -> bool:
        """Whether more steps would not change the verdict: the slope's confidence interval lies wholly within the
        limit (a pass), or wholly over it with a steady rise (a fail). A soak may stop here, before its budget."""
        low, high = theil_sen_interval(self.rss)
        if high <= limit_bytes_per_step:
            return True
        return low > limit_bytes_per_step and self.verdict(limit_bytes_per_step) == "fail"

    def judged(self, limit_bytes_per_step: float, limit_text: str) -> SoakVerdict:
        return SoakVerdict(self.verdict(limit_bytes_per_step), self, limit_text)

    def explain(self, limit_mb_per_1k: float) -> str:
        return (
            f"{self.what}: RSS grows {self.mb_per_1k:.2f} MB per 1,000 {self.per}s (limit {limit_mb_per_1k:g}); "
            f"{self.steps} {self.per}s in {self.seconds:.1f}s, {self.rss[0] / 1e6:.1f} -> {self.rss[-1] / 1e6:.1f} MB"
        )


@dataclass(frozen=True)
class SoakVerdict:
    """A soak judged against its limit (read by the ``slm_verdict`` fixture like a timing comparison)."""

    verdict: Verdict
    result: SoakResult
    limit: str
    why: str = "RSS rose, but not steadily (an arena growing once, or noise)"  # of an inconclusive verdict

    def explain(self) -> str:
        r = self.result
        quarters = " -> ".join(f"{mb:.1f}" for mb in r.quarters_mb())
        head = (
            f"{r.what}: RSS grows {r.bytes_per_step / 1e6:.3g} MB per {r.per} (robust slope; limit {self.limit}); "
            f"{r.steps - 1} {r.per}s in {r.seconds:.1f}s, medians by quarter {quarters} MB"
        )
        if self.verdict == "inconclusive":
            return f"inconclusive: {head}: {self.why}"
        return f"{self.verdict}: {head}"


def session_and_soak(session: SoakVerdict, soak: SoakVerdict | None) -> SoakVerdict:
    """One verdict from the session's generations and the warm soak after them (None: no soak).

    A steady rise over the session fails when the soak rises too, or when there is no soak to ask. When the
    soak stayed within the limit, the rise stopped by the end: a runtime still warming up (Foundry Local's
    grows for its first hundred or so requests), or a leak in requests the soak does not make: inconclusive.
    Without a steady rise over the session, the soak decides (the session's mixed prompts grow allocator
    arenas on the way, which is no leak but blurs a trend)."""
    if soak is None:
        return session
    if session.verdict != "fail":
        return soak
    if soak.verdict == "pass":
        why = (
            f"RSS rose steadily over the session's generations but not over the last {soak.result.steps - 1} "
            f"(the soak: {soak.result.mb_per_1k:.3g} MB per 1,000): a runtime warming up, or a leak in requests "
            "the soak does not make"
        )
        return SoakVerdict("inconclusive", session.result, session.limit, why)
    return session


def session_series(samples: Sequence[tuple[int, int, int]], *, warmup: int) -> tuple[int, ...]:
    """RSS attributable to generations, from every generation's ``(segment, tokens, rss)`` after ``warmup``.

    Only the growth from one generation to the next within a segment (generations one after the other, as
    in one test) counts: what other work does between segments (loading a second model, a load/unload
    cycle) is not the generations' doing. A generation that processes a longer sequence than any before it
    may grow its buffers once, so its growth does not count either. The series starts at the first sample's
    RSS and adds the counted growth, so a leak in every generation rises steadily and one-off growth does not.
    """
    kept = list(samples[warmup:])
    if not kept:
        return ()
    longest = max(tokens for _, tokens, _ in samples[: warmup + 1])
    series = [kept[0][2]]
    for previous, current in pairwise(kept):
        grown = current[2] - previous[2]
        counted = current[0] == previous[0] and current[1] <= longest
        longest = max(longest, current[1])
        series.append(series[-1] + (grown if counted else 0))
    return tuple(series)


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
