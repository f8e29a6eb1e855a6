"""Benchmarks: LLM metrics beside pytest-benchmark's timings, a history of runs, and regression gates.

pytest-benchmark times calls and gates on time statistics only; it cannot say
"decode tokens/s may not drop more than 5%". This module measures the LLM
figures (TTFT, prefill and decode tokens/s, peak RSS, CPU), keeps one record
per run in a JSON-lines history, and gates on them knowing which way is worse.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import psutil

from pytest_slmdeploy.errors import SettingsError
from pytest_slmdeploy.measure import PeakRss
from pytest_slmdeploy.report import GateResult
from pytest_slmdeploy.runtime import Generation

# metric -> (unit, bigger is better)
METRICS: dict[str, tuple[str, bool]] = {
    "ttft_ms": ("ms", False),
    "prefill_tps": ("tokens/s", True),
    "decode_tps": ("tokens/s", True),
    "decode_cpu_us": ("us", False),  # CPU time per decoded token, model alone on one thread (measure.model_alone)
    "e2e_ms": ("ms", False),
    "peak_rss_mb": ("MB", False),  # the deployed model alone in a fresh process (measure.model_alone)
    "process_peak_rss_mb": ("MB", False),  # the pytest process while benchmarking: reported, not gated
    "cpu_percent": ("%", False),
    "model_mb": ("MB", False),
    "size_ratio": ("x source", False),
    "build_s": ("s", False),
    "build_peak_rss_mb": ("MB", False),
    "warm_start_s": ("s", False),
    "bandwidth_efficiency": ("%", True),
    "top1_agreement": ("%", True),  # fidelity to the source (the slm_fidelity family)
    "mean_kld": ("nats", False),
}
# Defaults chosen from run-to-run spread on 2 cores (docs/benchmarks.md): wide enough not to fire on noise.
NOISE_PERCENT = 2.0  # changes smaller than this are not flagged in tables
DEFAULT_GATES = ("decode_tps:-15%", "decode_cpu_us:+15%", "ttft_ms:+25%", "peak_rss_mb:+25%")
# Figures that time the CPU: on a machine other processes keep busy they measure the load as much as the model.
TIMED = frozenset({"ttft_ms", "prefill_tps", "decode_tps", "e2e_ms", "cpu_percent", "warm_start_s",
                   "bandwidth_efficiency"})  # fmt: skip
BUSY_CPUS = 0.5  # other processes' CPU use (in CPUs) from which a run is busy (session.spinning decides alike)


def spread(values: Sequence[float]) -> float:
    """Interquartile range relative to the median (0.05 = 5%)."""
    if len(values) < 2:
        return 0.0
    ordered = sorted(values)
    q1, q3 = ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]
    mid = median(ordered)
    return (q3 - q1) / mid if mid else 0.0


@dataclass(frozen=True)
class GenerationStats:
    """Median figures (and relative spread) of repeated generations at one prompt length."""

    prompt_tokens: int
    new_tokens: int
    rounds: int
    ttft_ms: float
    prefill_tps: float
    decode_tps: float
    e2e_ms: float
    decode_spread: float
    ttft_spread: float
    process_peak_rss_mb: float  # this (pytest) process's peak during the rounds: Olive, torch and all
    cpu_percent: float
    decode_interval: float = 0.0  # width of the 95% interval of the median, as a share of it
    ttft_interval: float = 0.0

    @classmethod
    def of(cls, runs: Sequence[Generation], peak_rss: int, cpu_percent: float) -> GenerationStats:
        from pytest_slmdeploy.stats import relative_width

        ttfts = [r.ttft_s for r in runs]
        decodes = [r.decode_tokens_per_s for r in runs]
        return cls(
            prompt_tokens=runs[0].prompt_tokens,
            new_tokens=runs[0].new_tokens,
            rounds=len(runs),
            ttft_ms=round(median(ttfts) * 1000, 3),
            prefill_tps=round(runs[0].prompt_tokens / median(ttfts), 1) if median(ttfts) else 0.0,
            decode_tps=round(median(decodes), 2),
            e2e_ms=round(median(r.total_s for r in runs) * 1000, 3),
            decode_spread=round(spread(decodes), 4),
            ttft_spread=round(spread(ttfts), 4),
            process_peak_rss_mb=round(peak_rss / 1e6, 1),
            cpu_percent=round(cpu_percent, 1),
            decode_interval=round(relative_width(decodes), 4),
            ttft_interval=round(relative_width(ttfts), 4),
        )

    def too_wide(self, allowed: Mapping[str, float]) -> list[str]:
        """The figures whose interval is wider than ``allowed[metric]`` (a share of the median)."""
        return [m for m, share in allowed.items() if m in INTERVAL_OF and getattr(self, INTERVAL_OF[m]) > share]


# The per-round figures a gate can judge, and the interval that says how precise each is.
INTERVAL_OF = {"decode_tps": "decode_interval", "ttft_ms": "ttft_interval", "prefill_tps": "ttft_interval"}
CPU_PER_TOKEN = "decode_cpu_us"  # measured by measure.model_alone, decided on a busy machine too
BENCH_PREFIX = "slm_bench:"  # user property "slm_bench:<metric>" -> value (travels like figures under xdist)


def metrics_of(properties: Iterable[tuple[str, Any]]) -> dict[str, float]:
    return {k.removeprefix(BENCH_PREFIX): float(v) for k, v in properties if k.startswith(BENCH_PREFIX)}


def bare_decode(native_model: Any, prompt_ids: Sequence[int], new_tokens: int) -> tuple[int, float]:
    """A bare onnxruntime_genai greedy loop of exactly ``new_tokens`` tokens, as its own benchmark decodes:
    (tokens decoded after the first, seconds from the first token to the last). No plugin code in the loop."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(native_model)
    total = len(prompt_ids) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(native_model, params)
    generator.append_tokens(list(prompt_ids))
    generator.generate_next_token()
    generator.get_next_tokens()
    start, count = time.perf_counter(), 0
    while not generator.is_done():
        generator.generate_next_token()
        generator.get_next_tokens()
        count += 1
    return count, time.perf_counter() - start


def memory_bandwidth_bytes_per_s(threads: int = 1, size_mb: int = 256, repeats: int = 5) -> float:
    """Read bandwidth in bytes per second with ``threads`` threads each summing its share of a buffer far larger
    than the CPU caches: what decoding does with the weights (read them all, once per token, on the runtime's
    threads). NumPy releases the GIL while it sums, so the threads read in parallel."""
    import numpy as np

    threads = max(1, threads)
    data = np.ones(size_mb * 1_000_000 // 8, dtype=np.float64)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs; 0 where unknown): weights that fit in it are not read from memory."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


def bytes_read_per_token(model_dir: Path) -> int:
    """Weight bytes one decode step reads: every weight, but of an embedding table of its own (not the LM head's
    too, as a tied table shared with it is) one row only, so that table's bytes are left out."""
    import onnx

    weights = sum(p.stat().st_size for p in model_dir.glob("*.onnx*"))
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    sizes = {i.name: _tensor_bytes(i) for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    lookups = [n for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized") and "input_ids" in n.input]
    table = lookups[0].input[0] if lookups else ""
    own_table = sizes.get(table, 0) if uses.get(table, 0) == 1 else 0  # shared: the LM head reads it whole
    return max(weights - own_table, weights // 10)


def _tensor_bytes(tensor: Any) -> int:
    import onnx

    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    bits = {onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4}.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def bandwidth_efficiency(decode_tps: float, bytes_per_token: int, bandwidth: float) -> float:
    """Decode tokens/s as a share of the memory-bound ``bandwidth / bytes read per token``, in %."""
    bound = bandwidth / bytes_per_token if bytes_per_token else 0.0
    return 100 * decode_tps / bound if bound else 0.0


# -- history -------------------------------------------------------------------------------------
def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    return {
        "node": platform.node(),
        "system": platform.system(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


@dataclass(frozen=True)
class RunRecord:
    """One run's LLM metrics, as kept in the history."""

    name: str
    model: str
    fingerprint: str
    precision: str
    metrics: dict[str, float]
    created_at: float = field(default_factory=time.time)
    commit: str | None = None
    machine: dict[str, Any] = field(default_factory=machine_info)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class History:
    """JSON lines, one record per run, one file per model: ``<dir>/<model>.jsonl``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, model: str) -> Path:
        return self.folder / f"{model}.jsonl"

    def append(self, record: RunRecord) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(record.model)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(record.to_json() + "\n")
        return path

    def records(self, model: str | None = None) -> list[RunRecord]:
        paths = [self.path(model)] if model else sorted(self.folder.glob("*.jsonl"))
        found = []
        for path in paths:
            if path.is_file():
                found += [RunRecord.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line]
        return sorted(found, key=lambda r: r.created_at)

    def baseline(self, model: str, which: str) -> RunRecord | None:
        """``last`` (the newest record), a record's ``name``, or a JSON file holding one record."""
        if which not in ("last",) and Path(which).is_file():
            return RunRecord.from_dict(json.loads(Path(which).read_text()))
        records = self.records(model)
        if which == "last":
            return records[-1] if records else None
        named = [r for r in records if r.name == which]
        return named[-1] if named else None


# -- gates ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gate:
    """A metric may move at most ``percent`` in its bad direction from the baseline."""

    metric: str
    percent: float

    @classmethod
    def parse(cls, text: str) -> Gate:
        metric, _, limit = text.partition(":")
        number = limit.strip().rstrip("%").lstrip("+-")
        if metric not in METRICS or not number:
            raise SettingsError(
                f"benchmark gate {text!r}: use METRIC:N% with METRIC one of {', '.join(METRICS)} "
                "(e.g. decode_tps:-5% or peak_rss_mb:+10%)"
            )
        try:
            return cls(metric, float(number))
        except ValueError:
            raise SettingsError(f"benchmark gate {text!r}: {limit!r} is not a percentage") from None

    @property
    def limit(self) -> str:
        """The limit with the sign of the metric's bad direction: ``-15%``, ``+25%``."""
        return f"{'-' if METRICS[self.metric][1] else '+'}{self.percent:g}%"

    def check(self, value: float, baseline: float) -> str | None:
        """None if within the limit, else a message naming metric, baseline, value and limit."""
        if not baseline:
            return None
        unit, bigger_is_better = METRICS[self.metric]
        change = 100 * (value - baseline) / baseline
        worse = -change if bigger_is_better else change
        if worse <= self.percent:
            return None
        direction = "dropped" if bigger_is_better else "grew"
        return (
            f"{self.metric} {direction} {abs(change):.1f}%: {value:g} {unit} vs baseline {baseline:g} {unit} "
            f"(limit {self.limit})"
        )


def precision_for(gates: Iterable[Gate]) -> dict[str, float]:
    """How precise each gated figure must be: its interval may span at most the gate's tolerance (a wider
    one could fire the gate on this run's noise alone)."""
    return {g.metric: g.percent / 100 for g in gates if g.metric in INTERVAL_OF}


def _when(record: RunRecord) -> str:
    commit = f" @ {record.commit[:8]}" if record.commit else ""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at)) + commit


def evaluate_gates(gates: Iterable[Gate], current: Mapping[str, float], baseline: RunRecord) -> list[str]:
    """One message per gate that fails, or that cannot be evaluated because its metric is missing."""
    of_baseline = f"baseline run {baseline.name!r} of {_when(baseline)}"
    failures = []
    for gate in gates:
        missing = [
            where
            for where, metrics in (("this run's metrics", current), (of_baseline, baseline.metrics))
            if gate.metric not in metrics
        ]
        if missing:  # a gate that was never checked must not read as a gate that passed
            failures.append(
                f"gate {gate.metric}:{gate.limit} cannot be evaluated: "
                f"{gate.metric} is missing from {' and from '.join(missing)}"
            )
            continue
        message = gate.check(current[gate.metric], baseline.metrics[gate.metric])
        if message:
            failures.append(f"{message}; {of_baseline}")
    return failures


def busy_gates(gates: Iterable[Gate], busy_cpus: float, baseline: RunRecord) -> list[tuple[Gate, str]]:
    """Each timing gate that cannot be decided, with why: this run's timed tests, or the baseline run's, shared
    the machine with other processes using ``BUSY_CPUS`` or more. Comparing a busy run with a quiet one (either
    way round) measures the load, not the model: a healthy model on a busy CI runner must not fail, nor a slow
    one pass on a quiet machine against a busy baseline. Empty when both ran on a quiet machine (or the baseline
    predates the record)."""
    then = float((baseline.details or {}).get("busy_cpus", 0.0))
    if busy_cpus < BUSY_CPUS and then < BUSY_CPUS:
        return []
    which = (
        f"other processes used {busy_cpus:.1f} CPUs during this run's timed tests"
        if busy_cpus >= BUSY_CPUS
        else f"other processes used {then:.1f} CPUs during the baseline run {baseline.name!r}"
    )
    return [(g, f"gate {g.metric}:{g.limit} not decided: {which}") for g in gates if g.metric in TIMED]


def gates_the_baseline_predates(
    gates: Iterable[Gate], current: Mapping[str, float], baseline: RunRecord
) -> list[tuple[Gate, str]]:
    """Each gate whose metric this run measured and the baseline run has not (it was recorded before the metric
    existed, or with its test deselected), with why: the evidence cannot decide it, as a newly added default gate
    must not fail every history kept so far."""
    return [
        (g, f"gate {g.metric}:{g.limit} not decided: the baseline run {baseline.name!r} of {_when(baseline)} has no "
            f"{g.metric} (save a new baseline with --slm-bench-save)")
        for g in gates
        if g.metric in current and g.metric not in baseline.metrics
    ]  # fmt: skip


def judge(
    gates: Sequence[Gate], metrics: Mapping[str, float], baseline: RunRecord, *, busy_cpus: float,
    fail_inconclusive: bool = False,
) -> GateResult:  # fmt: skip
    """The gates' verdict on this run's ``metrics`` against ``baseline``. A gate whose metric this run lacks fails,
    busy or not (its check did not happen); one the baseline lacks and a timing gate on a busy machine are
    undecided: inconclusive, or failed with ``fail_inconclusive``."""
    present = [g for g in gates if g.metric in metrics and g.metric in baseline.metrics]
    unjudged = [*gates_the_baseline_predates(gates, metrics, baseline), *busy_gates(present, busy_cpus, baseline)]
    undecided = [reason for _, reason in unjudged]
    decided = [g for g in gates if g not in {gate for gate, _ in unjudged}]
    failures = evaluate_gates(decided, metrics, baseline)
    if failures or (undecided and fail_inconclusive):
        return GateResult("failed", f"benchmark gates FAILED against {baseline.name!r}", (*failures, *undecided))
    if undecided:
        judged = f"; {gates_passed_line(decided, metrics, baseline)}" if decided else ""
        return GateResult(
            "inconclusive", f"benchmark gates not decided against {baseline.name!r}{judged}", tuple(undecided)
        )
    return GateResult("passed", gates_passed_line(gates, metrics, baseline))


def gates_passed_line(gates: Iterable[Gate], current: Mapping[str, float], baseline: RunRecord) -> str:
    """One line with every gate's change, for gates that all passed (so a pass shows what it checked)."""
    changes = []
    for gate in gates:
        before, now = baseline.metrics[gate.metric], current[gate.metric]
        change = f"{100 * (now - before) / before:+.1f}%" if before else "n/a (baseline 0)"
        changes.append(f"{gate.metric} {change} (limit {gate.limit})")
    return f"benchmark gates passed against {baseline.name!r} ({_when(baseline)}): {', '.join(changes)}"


# -- export and tables ---------------------------------------------------------------------------
def github_action_benchmark(metrics: Mapping[str, float], prefix: str) -> dict[str, list[dict[str, Any]]]:
    """github-action-benchmark's custom formats, split by direction."""
    split: dict[str, list[dict[str, Any]]] = {"customBiggerIsBetter": [], "customSmallerIsBetter": []}
    for name, value in metrics.items():
        if name in METRICS:
            unit, bigger = METRICS[name]
            key = "customBiggerIsBetter" if bigger else "customSmallerIsBetter"
            split[key].append({"name": f"{prefix} {name}", "unit": unit, "value": value})
    return split


def markdown_table(records: Sequence[RunRecord], metrics: Sequence[str] | None = None) -> str:
    """Runs as rows, metrics as columns, with the change of the last run against the one before."""
    if not records:
        return "_no benchmark history_\n"
    names = list(metrics or [m for m in METRICS if any(m in r.metrics for r in records)])
    header = "| run | commit | " + " | ".join(f"{m} ({METRICS[m][0]})" for m in names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    for record in records:
        cells = [f"{record.metrics[m]:g}" if m in record.metrics else "-" for m in names]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.created_at))
        lines.append(f"| {record.name or when} | {(record.commit or '-')[:8]} | " + " | ".join(cells) + " |")
    if len(records) >= 2:
        last, before = records[-1], records[-2]
        deltas = []
        for m in names:
            if m in last.metrics and m in before.metrics and before.metrics[m]:
                change = 100 * (last.metrics[m] - before.metrics[m]) / before.metrics[m]
                good = (change >= 0) == METRICS[m][1] or abs(change) < NOISE_PERCENT
                deltas.append(f"{change:+.1f}% {'✅' if good else '⚠️'}")
            else:
                deltas.append("-")
        lines.append("| change | | " + " | ".join(deltas) + " |")
    return "\n".join(lines) + "\n"


def plot_history(records: Sequence[RunRecord], metrics: Sequence[str], out: Path) -> Path:
    """One PNG, a panel per metric, runs on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.4 * len(metrics)), squeeze=False, sharex=True)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        points = [(i, r.metrics[metric]) for i, r in enumerate(records) if metric in r.metrics]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        unit, bigger = METRICS[metric]
        ax.set_ylabel(f"{metric}\n({unit}, {'higher' if bigger else 'lower'} is better)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xticks(range(len(records)))
    names = [(r.name or str(i))[:16] for i, r in enumerate(records)]
    labels = [f"{name}\n{r.commit[:8]}" if r.commit else name for name, r in zip(names, records, strict=True)]
    axes[-1, 0].set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"pytest-slmdeploy benchmark history: {records[-1].model if records else ''}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class LlmBenchmark:
    """What the ``slm_benchmark`` fixture returns: time generations through pytest-benchmark and
    record the LLM metrics (in ``extra_info``, and for the history when ``reference``)."""

    def __init__(
        self,
        benchmark: Any,
        model: Any,
        record: Callable[[str, object], None],
        limits: Mapping[str, float],
        precision: Mapping[str, float] | None = None,
    ) -> None:
        self.benchmark, self.model, self.record = benchmark, model, record
        self.rounds = int(limits["benchmark_rounds"])
        self.max_rounds = int(limits["benchmark_max_rounds"])
        self.precision = dict(precision or {})  # metric -> widest interval allowed (see precision_for)
        self.seconds = float(limits["benchmark_seconds"])
        self.warmup = int(limits["benchmark_warmup"])
        self.new_tokens = int(limits["benchmark_new_tokens"])
        self.taken: RoundsTaken | None = None

    def __call__(
        self,
        prompt: Any,
        *,
        new_tokens: int | None = None,
        reference: bool = True,
        prompt_tokens: int | None = None,
        shared: Sequence[Generation] = (),
    ) -> GenerationStats:
        """Time ``prompt``; with ``prompt_tokens`` given, the warm-up is skipped when the session already ran a
        sequence at least that long (the first prefill at a new length allocates; later ones up to it do not).
        ``shared``: rounds of this very request measured already (the length sweep's): they count towards
        ``slm_benchmark_rounds``, and pytest-benchmark times the rest (at least one). Past the minimum, the
        ``reference`` figures (the history's) get more rounds while one that a gate judges (``precision``: a
        baseline is given, or the run is saved as a future baseline) has a wider interval than that gate's
        tolerance, up to ``slm_benchmark_max_rounds`` and ``slm_benchmark_seconds``; :attr:`taken` says how many
        rounds came from where."""
        n = new_tokens or self.new_tokens
        runs: list[Generation] = []
        warmup = self.warmup
        log = getattr(self.model, "memory_log", None)
        if shared or (prompt_tokens is not None and log and max(sample.tokens for sample in log) >= prompt_tokens):
            warmup = 0
        rounds = max(1, self.rounds - len(shared))

        def one() -> None:
            runs.append(self.model.generate(prompt, max_new_tokens=n, min_new_tokens=n))

        process = psutil.Process()
        process.cpu_percent(None)
        with PeakRss() as rss:
            self.benchmark.pedantic(one, rounds=rounds, warmup_rounds=warmup, iterations=1)
            rounds = min(rounds, len(runs))  # one call when pytest-benchmark is disabled (under pytest-xdist)
            measured = [*shared, *runs[-rounds:]]  # pedantic's warm-up rounds come first (none if disabled)
            start = time.perf_counter()
            while (
                reference  # only figures that a gate judges need more than the minimum
                and len(measured) < self.max_rounds
                and GenerationStats.of(measured, 0, 0).too_wide(self.precision)
                and time.perf_counter() - start < self.seconds
            ):
                one()
                measured.append(runs[-1])
        stats = GenerationStats.of(measured, rss.peak, process.cpu_percent(None))
        self.taken = RoundsTaken(len(shared), rounds, len(measured) - len(shared) - rounds)
        self.benchmark.extra_info["shared_rounds"] = len(shared)
        self.benchmark.extra_info["extra_rounds"] = self.taken.extra
        self.benchmark.extra_info.update(asdict(stats))
        if reference:
            for key in ("ttft_ms", "prefill_tps", "decode_tps", "e2e_ms", "process_peak_rss_mb", "cpu_percent"):
                self.record(f"{BENCH_PREFIX}{key}", getattr(stats, key))
        return stats


@dataclass(frozen=True)
class RoundsTaken:
    """Where a benchmark's rounds came from: the length sweep, pytest-benchmark, and more for the spread."""

    shared: int
    timed: int
    extra: int

    @property
    def total(self) -> int:
        return self.shared + self.timed + self.extra

    def describe(self) -> str:
        parts = []
        if self.shared:
            parts.append(f"{self.shared} from lengths")
        if self.extra:
            parts.append(f"{self.extra} more for the spread")
        return f"{self.total}" + (f" ({', '.join(parts)})" if parts else "")
