"""The compact LLM benchmark table that stands in for pytest-benchmark's in runs with ``--slm-model``.

pytest-benchmark's default table has a dozen time columns (about 190 characters) and none of the
figures an LLM is judged by. Runs with a model show one row per benchmark instead, from the figures
:class:`~pytest_slmdeploy.bench.LlmBenchmark` leaves in each benchmark's ``extra_info``; asking for
pytest-benchmark's own display (``--benchmark-columns``, ``--benchmark-sort``, ...) brings its table back.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

# Options that ask for pytest-benchmark's own table (or for what only its display makes: histograms,
# profiles, comparisons): given any of them, its table stays and this one is not shown.
PYTEST_BENCHMARK_DISPLAY_OPTIONS = (
    "--benchmark-columns",
    "--benchmark-sort",
    "--benchmark-group-by",
    "--benchmark-name",
    "--benchmark-time-unit",
    "--benchmark-verbose",
    "--benchmark-histogram",
    "--benchmark-cprofile",
    "--benchmark-compare",
)
TITLE = "benchmarks (medians; spread: IQR of decode tok/s; pytest-benchmark's table: --benchmark-columns=...)"
NAME_WIDTH = 30  # test_benchmark_generation[128], the built-in suite's longest
COLUMNS = (
    ("prompt", 6),
    ("TTFT ms", 7),
    ("prefill tok/s", 13),
    ("decode tok/s", 12),
    ("spread", 6),
    ("rounds", 6),
    ("proc RSS MB", 11),
)


@dataclass(frozen=True)
class Row:
    """One LLM benchmark: medians over its timed rounds."""

    name: str
    prompt_tokens: int
    ttft_ms: float
    prefill_tps: float
    decode_tps: float
    decode_spread: float  # interquartile range of decode tok/s over its median (0.05 = 5%)
    rounds: int
    process_peak_rss_mb: float  # the pytest process (the model alone: peak_rss_mb in the history)
    model: str = ""  # in a run of several models: the model it measured (its name then leaves it out)

    @classmethod
    def of(cls, name: str, info: dict[str, Any], model: str = "") -> Row | None:
        """The row of a benchmark's ``extra_info``, or None if it holds no LLM figures."""
        try:
            return cls(
                name=name,
                prompt_tokens=int(info["prompt_tokens"]),
                ttft_ms=float(info["ttft_ms"]),
                prefill_tps=float(info["prefill_tps"]),
                decode_tps=float(info["decode_tps"]),
                decode_spread=float(info["decode_spread"]),
                rounds=int(info["rounds"]),
                process_peak_rss_mb=float(info["process_peak_rss_mb"]),
                model=model,
            )
        except (KeyError, TypeError, ValueError):
            return None

    def cells(self) -> tuple[str, ...]:
        return (
            str(self.prompt_tokens),
            f"{self.ttft_ms:.1f}",
            f"{self.prefill_tps:.0f}",
            f"{self.decode_tps:.1f}",
            f"{100 * self.decode_spread:.1f}%",
            str(self.rounds),
            f"{self.process_peak_rss_mb:.0f}",
        )


def _short(name: str) -> str:
    return name if len(name) <= NAME_WIDTH else name[: NAME_WIDTH - 1] + "…"


def table_lines(rows: Sequence[Row]) -> list[str]:
    """A header and one line per row, figures right-aligned: at most 105 characters wide (and a first column of
    the model in a run of several models)."""
    width = max([len("benchmark")] + [len(_short(r.name)) for r in rows])
    models = max((len(_short(r.model)) for r in rows), default=0)
    first = f"{'model':<{models}}  " if models else ""
    header = first + "benchmark".ljust(width) + "".join(f"  {title:>{w}}" for title, w in COLUMNS)
    lines = [header]
    for row in rows:
        cells = "".join(f"  {cell:>{w}}" for cell, (_, w) in zip(row.cells(), COLUMNS, strict=True))
        model = f"{_short(row.model):<{models}}  " if models else ""
        lines.append(model + _short(row.name).ljust(width) + cells)
    return lines


def _model_and_name(benchmark: Any) -> tuple[str, str]:
    """The model a benchmark measured (its ``slm_target`` parameter) and its name without it."""
    model = str((getattr(benchmark, "params", None) or {}).get("slm_target", ""))
    name = str(benchmark.name)
    if model:
        name = name.replace(f"[{model}]", "").replace(f"-{model}]", "]").replace(f"[{model}-", "[")
    return model, name


def other_line(benchmark: Any) -> str:
    """A benchmark without LLM figures (a plain ``benchmark`` fixture): its median time, in one line."""
    stats = benchmark.stats
    return f"{benchmark.name}: median {stats.median * 1000:.3g} ms over {stats.rounds} rounds"


def explicitly_requested(config: pytest.Config) -> bool:
    """True if the command line, ``PYTEST_ADDOPTS`` or ini ``addopts`` name a display option of pytest-benchmark."""
    given = [*config.invocation_params.args, *shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))]
    given += list(config.getini("addopts"))
    return any(
        str(arg) == option or str(arg).startswith(f"{option}=")
        for arg in given
        for option in PYTEST_BENCHMARK_DISPLAY_OPTIONS
    )


def take_over(config: pytest.Config) -> list[str]:
    """Switch pytest-benchmark's terminal table off and return this table's lines instead.

    Call before pytest-benchmark's ``pytest_terminal_summary``. Returns nothing (and changes nothing) when the
    user asked for pytest-benchmark's display, when pytest-benchmark is quiet or absent, or nothing was measured.
    """
    benchmark_session = config.pluginmanager.get_plugin("pytest-benchmark")
    if benchmark_session is None or benchmark_session.quiet or explicitly_requested(config):
        return []
    measured = [b for b in benchmark_session.benchmarks if b]  # a benchmark without timed rounds is falsy
    if not measured:
        return []
    # `quiet` hides only the table (and cProfile, which --benchmark-cprofile keeps): its logger was set up
    # at configure time, and comparisons still gate with --benchmark-compare-fail.
    benchmark_session.quiet = True
    return lines_of(measured)


def lines_of(benchmarks: Iterable[Any]) -> list[str]:
    """The table of the LLM benchmarks, then one line per other benchmark."""
    rows, others = [], []
    for benchmark in benchmarks:
        model, name = _model_and_name(benchmark)
        row = Row.of(name, benchmark.extra_info, model)
        if row is None:
            others.append(other_line(benchmark))
        else:
            rows.append(row)
    return (table_lines(rows) if rows else []) + others
