"""Checklist item 3: no memory leaks in prolonged use (RSS trend after warm-up, robust to noise)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise
from statistics import NormalDist, median

from pytest_slmdeploy.measure import in_use_rss_bytes
from pytest_slmdeploy.runtime import Request, RssSample
from pytest_slmdeploy.stats import CONFIDENCE, Verdict

PROMPT_EDGES = (64, 256)  # prompt lengths (tokens) that part the kinds of request replayed
LONG_ANSWER = 32  # answers (tokens) longer than this are another kind


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

    def settled_within(self, limit_bytes_per_step: float) -> bool:
        """Settled as a pass: a soak may stop early here; a rise goes on to its budget, as it may yet level off."""
        return self.settled(limit_bytes_per_step) and self.verdict(limit_bytes_per_step) == "pass"

    def judged(self, limit_bytes_per_step: float, limit_text: str) -> SoakVerdict:
        return SoakVerdict(self.verdict(limit_bytes_per_step), self, limit_text, limit_bytes=limit_bytes_per_step)

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
    limit_bytes: float = 0.0  # the limit per step

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


def session_series(samples: Sequence[RssSample], *, warmup: int) -> tuple[int, ...]:
    """Memory attributable to the session's generations, from every generation's :class:`RssSample` after
    ``warmup``: each generation's own growth (after it against before it, a test's first generation's
    included), not what the caller does between generations (a test's own work, loading a second model). The
    measure is the C allocator's bytes in use where it can tell (every sample has them), else RSS: a
    generation's buffers land on pages freed by other work in between, or on fresh ones, which moves RSS
    but not the bytes in use. As the one explicit warm-up past ``warmup``, a generation that processes a
    longer sequence than any before it may grow its buffers once. The series starts at the first sample's
    value and adds the counted growth, so a leak in every generation, or in each test's first, rises
    steadily."""
    kept = list(samples[warmup:])
    if not kept:
        return ()
    heap = all(sample.heap for sample in kept)

    def after(sample: RssSample) -> int:
        return sample.heap if heap else sample.rss

    def before(sample: RssSample) -> int:
        return sample.heap_before if heap else sample.rss_before

    longest = max(sample.tokens for sample in samples[: warmup + 1])
    series = [after(kept[0])]
    for current in kept[1:]:
        counted = current.tokens <= longest
        longest = max(longest, current.tokens)
        series.append(series[-1] + (after(current) - before(current) if counted else 0))
    return tuple(series)


@dataclass(frozen=True)
class RequestKind:
    """Requests of one kind that the session made, for a replay soak to send again. ``first_in_test``: each
    opened a test (the replay starts a new memory segment before each, as a new test does)."""

    label: str
    requests: tuple[Request, ...]
    tokens: int  # median sequence length (prompt and answer) of the kind's generations in the session
    first_in_test: bool = False


def _label(request: Request, sample: RssSample) -> str:
    roles = [dict(message).get("role") for message in request.messages]
    prompt_tokens = sample.tokens - sample.new_tokens
    size = next((f"<={edge}" for edge in PROMPT_EDGES if prompt_tokens <= edge), f">{PROMPT_EDGES[-1]}")
    parts = [
        "system prompt" if "system" in roles else "",
        "multi-turn" if roles.count("user") > 1 else "",
        "sampled" if request.options.do_sample else "",
        f"prompt {size} tokens",
        f"answer {'>' if sample.new_tokens > LONG_ANSWER else '<='}{LONG_ANSWER} tokens",
    ]
    return ", ".join(part for part in parts if part)


def request_kinds(samples: Sequence[RssSample], requests: Mapping[str, Request]) -> list[RequestKind]:
    """The session's kinds of request (warm-up's included), each with its distinct requests in first-seen
    order: by system prompt, turns, sampling, prompt length and answer length; and one more kind, the
    requests that opened a test (a leak on a test's first generation repeats only there)."""
    by_label: dict[str, dict[str, list[int]]] = {}
    first: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        request = requests.get(sample.request)
        if request is None:
            continue
        by_label.setdefault(_label(request, sample), {}).setdefault(sample.request, []).append(sample.tokens)
        if i == 0 or samples[i - 1].segment != sample.segment:
            first.setdefault(sample.request, []).append(sample.tokens)

    def kind(label: str, seen: dict[str, list[int]], first_in_test: bool = False) -> RequestKind:
        tokens = int(median(t for lengths in seen.values() for t in lengths))
        return RequestKind(label, tuple(requests[key] for key in seen), tokens, first_in_test)

    kinds = [kind(label, seen) for label, seen in by_label.items()]
    return kinds + ([kind("a test's first generation", first, first_in_test=True)] if first else [])


def kind_limit(per_generation: float, per_token: float, tokens: int) -> tuple[float, str]:
    """The limit (bytes per generation, and as text) of a kind of request whose generations process ``tokens``:
    the per-generation limit, or the per-token one times ``tokens`` where lower, but never below half the
    per-generation limit: on a busy machine ONNX Runtime GenAI's sampled generations grow RSS by 2-3 kB each
    for a few hundred generations (0.2 kB each over 1,500), which a 15-token request's 1.5 kB would fail."""
    by_tokens = max(per_token * tokens, per_generation / 2)
    if by_tokens >= per_generation:
        return per_generation, f"{per_generation / 1e3:.3g} kB per generation"
    text = f"{by_tokens / 1e3:.3g} kB per generation: {per_token:g} B per token x {tokens} tokens"
    if by_tokens == per_generation / 2:
        text += f", raised to half of {per_generation / 1e3:.3g} kB"
    return by_tokens, text


def confirmed(first: SoakVerdict, again: SoakVerdict) -> SoakVerdict:
    """A replay that failed, judged with its repeat: a leak rises again, so the repeat's failure stands; growth
    that did not last (an allocator settling while other processes preempt the run) makes it inconclusive, not a
    failure of a healthy model. Seen once in 20 runs of a healthy model beside four CPU-bound processes: 12 kB
    per generation over 33 replayed generations."""
    if first.verdict != "fail" or again.verdict == "fail":
        return again if first.verdict == "fail" else first
    why = (
        f"RSS rose steadily in one replay ({first.result.bytes_per_step / 1e3:.3g} kB per {first.result.per}) and "
        f"not in its repeat ({again.result.bytes_per_step / 1e3:.3g} kB per {again.result.per}): growth that did "
        "not last"
    )
    return SoakVerdict("inconclusive", first.result, first.limit, why, first.limit_bytes)


def decide(session: SoakVerdict, replays: Sequence[SoakVerdict]) -> SoakVerdict:
    """One verdict from the session's own generations and the replay soak of each kind of request they made.

    A kind whose replay rises steadily over its limit fails (the worst is the headline). A steady rise over the
    session that no kind's replay reproduces is inconclusive (a runtime still warming up, as Foundry Local's
    grows for its first hundred or so requests, or growth between generations): a flat replay never turns a
    session's rise into a pass. Otherwise an undecided replay is inconclusive, and a pass shows the replay
    closest to its limit."""
    if not replays:
        return session

    def share(verdict: SoakVerdict) -> float:
        return verdict.result.bytes_per_step / verdict.limit_bytes if verdict.limit_bytes else 0.0

    failed = [v for v in replays if v.verdict == "fail"]
    if failed:
        return max(failed, key=share)
    worst = max(replays, key=share)
    if session.verdict == "fail":
        why = (
            "RSS rose steadily over the session's generations, but no kind of request rose when replayed "
            f"(the closest: {worst.result.what}, {worst.result.bytes_per_step / 1e3:.3g} kB per generation): "
            "a runtime warming up, or growth between generations"
        )
        return SoakVerdict("inconclusive", session.result, session.limit, why, session.limit_bytes)
    undecided = [v for v in replays if v.verdict == "inconclusive"]
    return max(undecided, key=share) if undecided else worst


def soak(
    step: Callable[[int], object],
    *,
    steps: int,
    warmup: int,
    time_budget_s: float,
    what: str = "soak",
    per: str = "generation",
    min_steps: int = 10,
    done: Callable[[SoakResult], bool] | None = None,
) -> SoakResult:
    """Run ``step(i)`` ``warmup`` times, then up to ``steps`` times, sampling RSS; past ``min_steps``, stop at
    the time budget or once ``done(result so far)`` (a settled trend)."""
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    samples = [in_use_rss_bytes()]

    def so_far() -> SoakResult:
        return SoakResult(what, tuple(samples), time.perf_counter() - start, per)

    for i in range(steps):
        step(warmup + i)
        samples.append(in_use_rss_bytes())
        if len(samples) > min_steps and (
            time.perf_counter() - start > time_budget_s or (done is not None and done(so_far()))
        ):
            break
    return so_far()
