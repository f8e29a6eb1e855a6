"""Runs with a model end with the plugin's compact LLM table instead of pytest-benchmark's wide one."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_slmdeploy import bench_table

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BENCHMARKS = """
import pytest

@pytest.mark.slm_benchmark
def test_speed(slm_benchmark):
    assert slm_benchmark("Do you ship abroad?", new_tokens=8).decode_tps > 0

def test_plain(benchmark):
    benchmark(sum, range(100))
"""
PYTEST_BENCHMARK_TABLE = "Name (time in "


def _benchmark(name: str, **extra_info: float) -> SimpleNamespace:
    return SimpleNamespace(name=name, extra_info=extra_info, stats=SimpleNamespace(median=0.0012345, rounds=7))


def test_one_row_per_llm_benchmark_and_a_line_per_other() -> None:
    llm = _benchmark(
        "test_benchmark_generation[128]", prompt_tokens=128, ttft_ms=12.345, prefill_tps=10368.9, decode_tps=812.55,
        decode_spread=0.0213, rounds=10, process_peak_rss_mb=412.3, e2e_ms=50.0,
    )  # fmt: skip
    long_name = _benchmark("test_" + "x" * 60, prompt_tokens=16, ttft_ms=1.0, prefill_tps=1.0, decode_tps=1.0,
                           decode_spread=0.0, rounds=3, process_peak_rss_mb=1.0)  # fmt: skip
    lines = bench_table.lines_of([llm, _benchmark("test_plain"), long_name])
    assert re.split(r"\s{2,}", lines[0]) == [
        "benchmark", "prompt", "TTFT ms", "prefill tok/s", "decode tok/s", "spread", "rounds", "proc RSS MB"
    ]  # fmt: skip
    assert lines[1].split() == ["test_benchmark_generation[128]", "128", "12.3", "10369", "812.5", "2.1%", "10", "412"]
    assert lines[2].split()[0] == "test_" + "x" * 24 + "…"
    assert lines[3] == "test_plain: median 1.23 ms over 7 rounds"
    assert max(len(line) for line in lines) <= 105  # pytest-benchmark's: about 190
    # Figures right-aligned under their headings.
    assert lines[0].index("prompt") + len("prompt") == lines[1].index(" 128 ") + len(" 128")
    assert lines[0].index("proc RSS MB") + len("proc RSS MB") == len(lines[1])


def test_a_model_run_shows_the_compact_table_not_pytest_benchmarks(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path
) -> None:
    pytester.makepyfile(BENCHMARKS)
    args = (f"--slm-model={tiny_model}", f"--slm-cache={warm_cache}", "--slm-no-suite", "-p", "no:cacheprovider")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert PYTEST_BENCHMARK_TABLE not in out
    result.stdout.fnmatch_lines(
        [
            "*= slmdeploy =*",
            bench_table.TITLE,
            "  benchmark * prompt * TTFT ms * prefill tok/s * decode tok/s * spread * rounds * proc RSS MB",
            "  test_speed *",
            "  test_plain: median * ms over * rounds",
        ]
    )
    row = next(line for line in result.stdout.lines if line.startswith("  test_speed "))
    prompt, ttft, prefill, decode, spread, rounds, rss = row.split()[1:]
    assert int(prompt) > 0
    assert float(ttft) > 0
    assert float(prefill) > 0
    assert float(decode) > 0
    assert spread.endswith("%")
    assert 3 <= int(rounds) <= 20  # slm_benchmark_rounds, then more while the spread is wide (max_rounds)
    assert float(rss) > 0
    table = out[out.index(bench_table.TITLE) :].splitlines()
    assert max(len(line) for line in table[: table.index(row) + 2]) <= 2 + 105


@pytest.mark.parametrize(
    "ask", [("--benchmark-columns=min,max",), ("--benchmark-sort", "mean"), ("--benchmark-verbose",)]
)
def test_asking_for_pytest_benchmarks_display_keeps_its_table(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path, ask: tuple[str, ...]
) -> None:
    pytester.makepyfile(BENCHMARKS)
    args = (f"--slm-model={tiny_model}", f"--slm-cache={warm_cache}", "--slm-no-suite", "-p", "no:cacheprovider")
    result = pytester.runpytest_subprocess(*args, *ask)
    result.assert_outcomes(passed=2)
    assert PYTEST_BENCHMARK_TABLE in result.stdout.str()
    assert bench_table.TITLE not in result.stdout.str()


def test_without_a_model_pytest_benchmark_is_left_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain(benchmark):\n    benchmark(sum, range(100))\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert PYTEST_BENCHMARK_TABLE in result.stdout.str()
    assert bench_table.TITLE not in result.stdout.str()
