"""Benchmarks: statistics, history, direction-aware gates, export, and the pytest run end to end."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_slmdeploy import bench
from pytest_slmdeploy.errors import SettingsError
from pytest_slmdeploy.report import GateResult, RunReport
from pytest_slmdeploy.runtime import Generation

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


BUSY = "not decided: other processes used"  # a timing gate's reason when other processes kept the machine busy


def _record(name: str, created: float, **metrics: float) -> bench.RunRecord:
    return bench.RunRecord(name=name, model="m", fingerprint="f", precision="int4", metrics=metrics, created_at=created)


def test_stats_of_generations() -> None:
    runs = [Generation("x", 100, 33, "length", ttft, ttft + 0.32, ()) for ttft in (0.1, 0.2, 0.3)]
    stats = bench.GenerationStats.of(runs, peak_rss=200_000_000, cpu_percent=150.0)
    assert stats.ttft_ms == 200.0
    assert stats.prefill_tps == 500.0  # 100 prompt tokens / 0.2 s
    assert stats.decode_tps == 100.0  # 32 tokens after the first in 0.32 s
    assert stats.e2e_ms == 520.0
    assert stats.process_peak_rss_mb == 200.0
    assert bench.spread([1.0, 1.0, 1.0, 1.0]) == 0.0
    assert bench.spread([90.0, 100.0, 110.0, 120.0]) == pytest.approx(0.19, abs=0.01)


class _Pedantic:
    """pytest-benchmark's fixture as LlmBenchmark uses it: warm-up rounds, then timed rounds, once."""

    def __init__(self) -> None:
        self.extra_info: dict[str, object] = {}
        self.timed = 0

    def pedantic(self, target: object, *, rounds: int, warmup_rounds: int, iterations: int) -> None:
        for _ in range(warmup_rounds + rounds):
            target()  # type: ignore[operator]
        self.timed = rounds


class _Model:
    """Answers with decode times taken in turn from ``per_token_s`` (seconds per token)."""

    def __init__(self, per_token_s: list[float]) -> None:
        self.per_token_s, self.calls = per_token_s, 0

    def generate(self, prompt: str, *, max_new_tokens: int, min_new_tokens: int) -> Generation:
        per_token = self.per_token_s[self.calls % len(self.per_token_s)]
        self.calls += 1
        return Generation("x", 100, max_new_tokens, "length", 0.1, 0.1 + per_token * (max_new_tokens - 1), ())


def _limits(**changes: float) -> dict[str, float]:
    from pytest_slmdeploy.settings import LIMITS

    return {**{key: default for key, (default, _) in LIMITS.items()}, **changes}


def _shared(count: int) -> list[Generation]:
    return [Generation("x", 100, 32, "length", 0.1, 0.1 + 0.01 * 31, ())] * count


GATED = bench.precision_for(bench.Gate.parse(g) for g in bench.DEFAULT_GATES)  # decode 15%, TTFT 25%


@pytest.mark.parametrize(
    ("per_token_s", "shared", "timed", "extra"),
    [
        ([0.01], 0, 3, 0),  # steady: the minimum is enough
        ([0.01], 3, 1, 0),  # the length sweep's rounds count; pytest-benchmark still times one
        ([0.01, 0.02, 0.015], 0, 3, 17),  # +-33% around the median never narrows: up to slm_benchmark_max_rounds
        ([0.01, 0.02, 0.0101, 0.0099, 0.01, 0.0102, 0.01, 0.0098], 0, 3, 4),  # one outlier: a few more rounds
    ],
)
def test_benchmark_rounds_adapt_to_the_spread(per_token_s: list[float], shared: int, timed: int, extra: int) -> None:
    fixture, model = _Pedantic(), _Model(per_token_s)
    llm = bench.LlmBenchmark(fixture, model, lambda name, value: None, _limits(benchmark_warmup=0), GATED)
    stats = llm(("Hello"), new_tokens=32, shared=_shared(shared))
    assert llm.taken == bench.RoundsTaken(shared, timed, extra)
    assert fixture.timed == timed
    assert stats.rounds == shared + timed + extra
    assert (not stats.too_wide(GATED)) is (extra < 17)
    assert fixture.extra_info["extra_rounds"] == extra


def test_only_the_gated_figures_get_more_rounds() -> None:
    assert GATED == {"decode_tps": 0.15, "ttft_ms": 0.25}
    noisy = [0.01, 0.02, 0.015]
    llm = bench.LlmBenchmark(_Pedantic(), _Model(noisy), lambda n, v: None, _limits(), GATED)
    stats = llm("Hello", new_tokens=32, reference=False)  # not in the history: no gate judges it
    assert llm.taken == bench.RoundsTaken(0, 3, 0)
    assert stats.too_wide(GATED) == ["decode_tps"]
    unjudged = bench.LlmBenchmark(_Pedantic(), _Model(noisy), lambda n, v: None, _limits())  # no baseline, no save
    unjudged("Hello", new_tokens=32)
    assert unjudged.taken == bench.RoundsTaken(0, 3, 0)


def test_benchmark_rounds_stop_at_the_time_budget() -> None:
    llm = bench.LlmBenchmark(_Pedantic(), _Model([0.01, 0.02]), lambda n, v: None, _limits(benchmark_seconds=0), GATED)
    llm("Hello", new_tokens=32)
    assert llm.taken == bench.RoundsTaken(0, 3, 0)
    assert llm.taken.describe() == "3"
    assert bench.RoundsTaken(3, 1, 2).describe() == "6 (3 from lengths, 2 more for the spread)"


@pytest.mark.parametrize(
    ("gate", "value", "baseline", "fails"),
    [
        ("decode_tps:-5%", 96.0, 100.0, False),
        ("decode_tps:-5%", 94.0, 100.0, True),
        ("decode_tps:-5%", 150.0, 100.0, False),  # faster is never a regression
        ("ttft_ms:+10%", 109.0, 100.0, False),
        ("ttft_ms:+10%", 111.0, 100.0, True),
        ("ttft_ms:+10%", 50.0, 100.0, False),
        ("peak_rss_mb:10", 120.0, 100.0, True),
    ],
)
def test_gates_know_which_way_is_bad(gate: str, value: float, baseline: float, fails: bool) -> None:
    message = bench.Gate.parse(gate).check(value, baseline)
    assert (message is not None) is fails
    if message:
        assert gate.split(":")[0] in message
        assert f"{value:g}" in message
        assert f"baseline {baseline:g}" in message
        assert "limit" in message


@pytest.mark.parametrize("text", ["tokens:-5%", "decode_tps", "decode_tps:fast"])
def test_bad_gates(text: str) -> None:
    with pytest.raises(SettingsError, match="benchmark gate"):
        bench.Gate.parse(text)


def test_history_baselines_and_table(tmp_path: Path) -> None:
    history = bench.History(tmp_path)
    assert history.baseline("m", "last") is None
    history.append(_record("v1", 1.0, decode_tps=100.0, ttft_ms=10.0))
    history.append(_record("v2", 2.0, decode_tps=90.0, ttft_ms=12.0))
    assert [r.name for r in history.records("m")] == ["v1", "v2"]
    last = history.baseline("m", "last")
    assert last is not None
    assert last.name == "v2"
    named = history.baseline("m", "v1")
    assert named is not None
    assert named.metrics["decode_tps"] == 100.0
    stored = tmp_path / "baseline.json"
    stored.write_text(_record("file", 3.0, decode_tps=1000.0).to_json())
    from_file = history.baseline("m", str(stored))
    assert from_file is not None
    assert from_file.name == "file"
    table = bench.markdown_table(history.records("m"))
    assert "| v2 |" in table
    assert "-10.0% ⚠️" in table  # decode fell: bad
    assert "+20.0% ⚠️" in table  # TTFT rose: bad
    failures = bench.evaluate_gates([bench.Gate.parse("decode_tps:-5%")], {"decode_tps": 90.0}, named)
    assert len(failures) == 1
    assert "baseline run 'v1'" in failures[0]


def test_a_gate_that_cannot_be_evaluated_fails() -> None:
    baseline = _record("v1", 1.0, decode_tps=100.0, peak_rss_mb=50.0)
    gates = [bench.Gate.parse(g) for g in ("decode_tps:-5%", "ttft_ms:+10%", "peak_rss_mb:+10%")]
    failures = bench.evaluate_gates(gates, {"decode_tps": 99.0, "ttft_ms": 10.0}, baseline)
    assert failures == [
        "gate ttft_ms:+10% cannot be evaluated: ttft_ms is missing from baseline run 'v1' of "
        + time.strftime("%Y-%m-%d %H:%M", time.localtime(1.0)),
        "gate peak_rss_mb:+10% cannot be evaluated: peak_rss_mb is missing from this run's metrics",
    ]  # decode_tps is within its limit: no message
    (both,) = bench.evaluate_gates([bench.Gate.parse("prefill_tps:-5%")], {}, baseline)
    assert both.startswith("gate prefill_tps:-5% cannot be evaluated: prefill_tps is missing from this run's metrics")
    assert "and from baseline run 'v1'" in both
    assert bench.evaluate_gates(gates[:1], {"decode_tps": 99.0}, baseline) == []


def test_a_passed_gate_names_its_baseline_and_every_change() -> None:
    baseline = bench.RunRecord("v1", "m", "f", "int4", {"decode_tps": 100.0, "ttft_ms": 10.0}, 1.0, "abcdef1234")
    gates = [bench.Gate.parse(g) for g in ("decode_tps:15", "ttft_ms:+25%")]
    assert [gate.limit for gate in gates] == ["-15%", "+25%"]  # the sign is the bad direction, whatever was typed
    current = {"decode_tps": 98.8, "ttft_ms": 10.3}
    assert bench.evaluate_gates(gates, current, baseline) == []
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(1.0))
    assert bench.gates_passed_line(gates, current, baseline) == (
        f"benchmark gates passed against 'v1' ({when} @ abcdef12): "
        "decode_tps -1.2% (limit -15%), ttft_ms +3.0% (limit +25%)"
    )


@pytest.mark.parametrize(
    ("gates", "ok", "expected"),
    [
        (
            GateResult(
                "failed", "benchmark gates FAILED against 'v1'", ("decode_tps dropped 20.0%: x", "ttft_ms grew")
            ),
            False,
            "❌ **benchmark gates FAILED against 'v1'**\n\n- decode_tps dropped 20.0%: x\n- ttft_ms grew\n",
        ),
        (GateResult("passed", "benchmark gates passed against 'v1' (...): decode_tps -1.2%"), True, "✅ benchmark"),
        (GateResult("bootstrap", "no baseline yet for m: this run becomes the baseline"), True, "🆕 no baseline yet"),
    ],
    ids=["failed", "passed", "bootstrap"],
)
def test_the_step_summary_gives_the_gates_verdict(gates: GateResult, ok: bool, expected: str) -> None:
    report = RunReport(model={"name": "m"}, gates=gates)
    markdown = report.to_markdown()
    assert markdown.startswith(f"### pytest-slmdeploy: m {'passed' if ok else 'FAILED'}")
    assert f"\n{expected}" in markdown
    assert report.to_json()["gates"] == {"status": gates.status, "summary": gates.summary, "reasons": [*gates.reasons]}


def test_github_action_benchmark_export() -> None:
    exported = bench.github_action_benchmark({"decode_tps": 30.0, "ttft_ms": 190.0, "unknown": 1.0}, "m")
    assert exported["customBiggerIsBetter"] == [{"name": "m decode_tps", "unit": "tokens/s", "value": 30.0}]
    assert exported["customSmallerIsBetter"] == [{"name": "m ttft_ms", "unit": "ms", "value": 190.0}]


def test_plot(tmp_path: Path) -> None:
    records = [_record(f"v{i}", float(i), decode_tps=100.0 + i, ttft_ms=10.0) for i in range(3)]
    out = bench.plot_history(records, ["decode_tps", "ttft_ms"], tmp_path / "history.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bytes_read_per_token_leaves_out_the_embedding_table(warm_cache: Path) -> None:
    """The tiny model does not tie its LM head to its embedding: the 8-bit table (512 x 64) is read a row at a
    time. A tied table (SmolLM2, test_real_model) is the LM head's too, read whole every token."""
    entry = warm_cache / "custom" / "faq-int4"
    weights = sum(p.stat().st_size for p in entry.glob("*.onnx*"))
    assert bench.bytes_read_per_token(entry) == weights - 512 * 64


def test_bandwidth_efficiency() -> None:
    assert bench.bandwidth_efficiency(decode_tps=10.0, bytes_per_token=1_000_000_000, bandwidth=20e9) == 50.0
    assert bench.memory_bandwidth_bytes_per_s(threads=2, size_mb=16, repeats=2) > 1e8
    assert bench.last_level_cache_bytes() >= 0


def test_benchmarks_record_history_and_gate(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # else pytest-benchmark disables itself in the run
    history = tmp_path / "history"
    args = (
        "--slm-model",
        str(tiny_model),
        "--slm-cache",
        str(warm_cache),
        "-m",
        "slm_benchmark",
        "-p",
        "no:cacheprovider",
    )
    first = pytester.runpytest_subprocess(
        *args, "--slm-bench-save", "--slm-bench-history", str(history), "--slm-bench-name", "base",
        "--benchmark-json", "bench.json", "--slm-bench-export", "gab.json",
    )  # fmt: skip
    first.assert_outcomes(passed=2, skipped=1)  # 512 + 32 tokens do not fit the 512-token context
    first.stdout.fnmatch_lines(["pass *Benchmark*decode tok/s @128*", "benchmark history: appended to *faq-int4.jsonl"])
    (record,) = [json.loads(line) for line in (history / "faq-int4.jsonl").read_text().splitlines()]
    assert record["name"] == "base"
    assert {"decode_tps", "decode_cpu_us", "ttft_ms", "prefill_tps", "peak_rss_mb", "model_mb", "build_s"} <= set(
        record["metrics"]
    )
    # Issue 21, item 3: peak_rss_mb was the pytest process (575 MB for this 0.3 MB model in a whole run: Olive,
    # torch, the fp32 source); now it is the model alone in a fresh process, the process's own peak beside it.
    metrics = record["metrics"]
    assert 10 < metrics["peak_rss_mb"] < 150, metrics
    assert metrics["process_peak_rss_mb"] > metrics["peak_rss_mb"], metrics
    # Item 11: bandwidth efficiency was headlined for a model whose weights fit the CPU cache (no memory bound).
    assert "bandwidth_efficiency" not in metrics
    first.stdout.fnmatch_lines(["*bandwidth efficiency n/a: * MB read per token fit the * MiB CPU cache*"])
    assert record["machine"]["cpu_count"] >= 1
    benchmarks = json.loads((pytester.path / "bench.json").read_text())["benchmarks"]
    tokens = sorted(b["extra_info"]["prompt_tokens"] for b in benchmarks)
    assert len(tokens) == 2
    assert 8 < tokens[0] <= 16 < 100 < tokens[1] <= 128
    assert all("decode_tps" in b["extra_info"] for b in benchmarks)
    assert json.loads((pytester.path / "gab.json").read_text())["customBiggerIsBetter"]

    # A baseline ten times faster: in decode speed, and in CPU time per token, which a busy machine cannot hide.
    faster = {"decode_tps": metrics["decode_tps"] * 10, "decode_cpu_us": metrics["decode_cpu_us"] / 10}
    (tmp_path / "fast.json").write_text(json.dumps(dict(record, metrics=metrics | faster)))
    summary = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("CI", "true")  # as on GitHub: the short summary is not cut to the terminal's width
    gated = pytester.runpytest_subprocess(
        *args, "-v", f"--slm-bench-baseline={tmp_path / 'fast.json'}", "--junitxml", "junit.xml",
    )  # fmt: skip
    assert gated.ret == pytest.ExitCode.TESTS_FAILED
    gated.assert_outcomes(passed=2, skipped=1, failed=1)  # the gate is a test of the run: it counts
    if BUSY in gated.stdout.str():  # the timing gates are not decided: the CPU time per token fails the run
        gated.stdout.fnmatch_lines([f"benchmark gate FAILED: gate decode_tps:-15% {BUSY} *"])
        metric, reason = (
            "decode_cpu_us",
            "decode_cpu_us grew *%: * us vs baseline * us (limit +15%); baseline run 'base'*",
        )
    else:
        metric, reason = (
            "decode_tps",
            "decode_tps dropped *%: * tokens/s vs baseline * tokens/s (limit -15%); baseline run 'base'*",
        )
    gated.stdout.fnmatch_lines(
        [
            "*::test_benchmark_generation* PASSED*",
            "*slmdeploy::benchmark_gates FAILED*",  # last, after the benchmarks it judges
            "*= FAILURES =*",
            "*_ slmdeploy::benchmark_gates _*",
            reason,
            "*= slmdeploy =*",
            f"benchmark gate FAILED: {reason}",
            "*= short test summary info =*",
            f"FAILED *slmdeploy::benchmark_gates - {reason}",
            "*= 1 failed, 2 passed, 1 skipped*",
        ]
    )
    junit = (pytester.path / "junit.xml").read_text()
    assert 'failures="1"' in junit
    gate_case = r'<testcase classname="slmdeploy" name="benchmark_gates"[^>]*>(<properties>.*?</properties>)?'
    assert re.search(gate_case + f'<failure message="{metric} (dropped|grew)', junit)
    markdown = summary.read_text()
    assert "❌ **benchmark gates FAILED against 'base'**" in markdown
    assert re.search(rf"^- {metric} (dropped|grew) [\d.]+%: .* \(limit [-+]15%\); baseline run 'base'", markdown, re.M)


SPEED_TEST = """
import pytest

@pytest.mark.slm_benchmark
def test_speed(slm_benchmark):
    assert slm_benchmark("Do you ship abroad?", new_tokens=8).decode_tps > 0
"""
EASY = {"decode_tps": 0.001, "decode_cpu_us": 1e9, "ttft_ms": 1e9, "peak_rss_mb": 1e9}  # every run passes these
HARD = {"decode_tps": 1e12, "decode_cpu_us": 1e-9, "ttft_ms": 1e-9, "peak_rss_mb": 1e-9}  # no run passes these


# ``lines`` hold whether or not other processes keep the machine busy during the run (the CPU-time and memory
# gates are decided either way); ``quiet`` only on a quiet machine, where the timing gates are decided too. On a
# busy one the run must say instead that they were not decided, and why.
@pytest.mark.parametrize(
    ("baseline", "record", "extra", "outcomes", "lines", "quiet", "markdown"),
    [
        (
            "last", None, (), {"passed": 2},
            ["no baseline yet for faq-int4: this run becomes the baseline (save it with --slm-bench-save)"], [],
            "🆕 no baseline yet for faq-int4: this run becomes the baseline (save it with --slm-bench-save)",
        ),
        (
            "v1", None, (), {"passed": 1, "failed": 1},
            ["FAILED slmdeploy::benchmark_gates - no baseline 'v1' for faq-int4 in * (run once with --slm-bench-save*"],
            [], "- no baseline 'v1' for faq-int4 in ",
        ),
        (
            "last", EASY, ("-v",), {"passed": 2},
            [
                "slmdeploy::benchmark_gates PASSED*",
                "*benchmark gates passed against 'base' (*): *decode_cpu_us -100.0% (limit +15%), *peak_rss_mb "
                "-100.0% (limit +25%)",
            ],
            [
                "benchmark gates passed against 'base' (*): decode_tps +*% (limit -15%), decode_cpu_us -100.0% "
                "(limit +15%), ttft_ms -100.0% (limit +25%), peak_rss_mb -100.0% (limit +25%)",
            ],
            "benchmark gates passed against 'base' (",
        ),
        (
            "last", HARD, ("-n", "2"), {"passed": 1, "failed": 1},  # judged by xdist's controller: it has every metric
            [
                "benchmark gate FAILED: decode_cpu_us grew *: * us vs baseline 1e-09 us (limit +15%); baseline run *",
                "FAILED slmdeploy::benchmark_gates - * (limit *); baseline run 'base' *",
            ],
            ["FAILED slmdeploy::benchmark_gates - decode_tps dropped 100.0%: * (limit -15%); baseline run 'base' *"],
            "- decode_cpu_us grew ",
        ),
    ],
    ids=["bootstrap", "missing-name", "passed", "xdist-regression"],
)  # fmt: skip
def test_the_gate_item(
    pytester: pytest.Pytester,
    tiny_model: Path,
    warm_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    baseline: str,
    record: dict[str, float] | None,
    extra: tuple[str, ...],
    outcomes: dict[str, int],
    lines: list[str],
    quiet: list[str],
    markdown: str,
) -> None:
    history = pytester.path / "history"
    if record is not None:
        bench.History(history).append(bench.RunRecord("base", "faq-int4", "f", "int4", record))
    pytester.makepyfile(SPEED_TEST)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # else pytest-benchmark disables itself in the run
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(pytester.path / "summary.md"))
    monkeypatch.setenv("CI", "true")  # as on GitHub: the short summary is not cut to the terminal's width
    result = pytester.runpytest_subprocess(
        f"--slm-model={tiny_model}", f"--slm-cache={warm_cache}", "--slm-no-suite", "-p", "no:cacheprovider",
        f"--slm-bench-history={history}", f"--slm-bench-baseline={baseline}", "--junitxml=junit.xml", *extra,
    )  # fmt: skip
    assert result.parseoutcomes() == outcomes
    assert result.ret == (pytest.ExitCode.TESTS_FAILED if "failed" in outcomes else pytest.ExitCode.OK)
    result.stdout.fnmatch_lines(lines)
    summary = (pytester.path / "summary.md").read_text()
    if BUSY in result.stdout.str():
        result.stdout.fnmatch_lines(["*gate decode_tps:-15% not decided: other processes used * CPUs during *"])
        assert record is None or "❌" in summary or "⚠️ benchmark gates not decided" in summary
    else:
        result.stdout.fnmatch_lines(quiet)
        assert record is not EASY or "✅ benchmark gates passed" in summary
    assert markdown in summary
    junit = (pytester.path / "junit.xml").read_text()
    assert f'failures="{outcomes.get("failed", 0)}"' in junit
    assert '<testcase classname="slmdeploy" name="benchmark_gates"' in junit
    assert not history.exists() or record is not None, "without --slm-bench-save nothing is saved"


def test_skipped_checks_are_not_passed_in_any_report() -> None:
    """Issue 21, item 5: a skipped domain family and a skipped Foundry smoke test read 'passed' in the step
    summary's headline and nowhere said what was not checked."""
    from pytest_slmdeploy.report import FAMILY_PROPERTY

    report = RunReport(model={"name": "m"})
    smoke, domain = [(FAMILY_PROPERTY, "smoke")], [(FAMILY_PROPERTY, "domain")]
    report.record("t::loads", "call", "passed", smoke)
    report.record("t::foundry", "setup", "skipped", smoke, "foundry-local-sdk is not installed")
    report.record("t::cases", "call", "skipped", domain, "no domain cases")
    assert report.ok
    assert report.headline == "passed, 2 not checked"
    assert report.families["domain"].status == "skipped"
    markdown = report.to_markdown()
    assert markdown.startswith("### pytest-slmdeploy: m passed, 2 not checked")
    assert "Not checked (skipped, not passed):" in markdown
    assert ": foundry-local-sdk is not installed" in markdown
    assert ": no domain cases" in markdown
    data = report.to_json()
    assert data["headline"] == "passed, 2 not checked"
    assert len(data["not_checked"]) == 2


# onnxruntime_genai with its decode about 25% slower, as a slower runtime release would be: each decode step works
# 25% more, beside the wrapper's own Python call (the CPU time per token grew 24.7-30.1% in four runs; the gate
# allows 15%). With 15% more work it grew 22-25%, and once, in a fresh clone's test job, less than 15%: too close to
# the limit to prove the gate. A sitecustomize on PYTHONPATH, so the model-alone process the CPU gate reads runs it
# too. The extra work is CPU time, measured as such: a busy machine neither hides nor inflates it.
SLOWER_RUNTIME = """
import time

import onnxruntime_genai as og

_Generator = og.Generator


class Generator:
    def __init__(self, model, params):
        self._generator, self._steps = _Generator(model, params), 0
        self.is_done, self.get_next_tokens = self._generator.is_done, self._generator.get_next_tokens

    def generate_next_token(self):
        start = time.process_time()
        self._generator.generate_next_token()
        self._steps += 1
        if self._steps > 1:  # a decode step (the first one follows the prompt)
            end = time.process_time() + 0.25 * (time.process_time() - start)
            while time.process_time() < end:
                pass

    def __getattr__(self, name):
        return getattr(self._generator, name)


og.Generator = Generator
"""


def test_a_quarter_slower_decode_fails_the_gate_on_a_busy_machine_too(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21, item 9: the gates were shown to fail only 10x and 1e12 baselines, and on a busy machine no timing
    gate decides. A run saved as the baseline on a quiet machine, then the same model through a runtime whose decode
    is about 25% slower (the default gate on CPU time per token allows +15%), quiet and beside two CPU-bound
    processes: the CPU gate fails both times, with the growth about as planted."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # else pytest-benchmark disables itself in the run
    args = ("--slm-model", str(tiny_model), "--slm-cache", str(warm_cache), "-m", "slm_benchmark",
            "-p", "no:cacheprovider", "--slm-bench-history", str(tmp_path / "history"),
            "--rootdir", str(pytester.path), "--slm-bench-baseline=base")  # fmt: skip
    saved = pytester.runpytest_subprocess(*args[:-1], "--slm-bench-save", "--slm-bench-name", "base")
    saved.assert_outcomes(passed=2, skipped=1)
    slower = tmp_path / "slower-runtime"
    slower.mkdir()
    (slower / "sitecustomize.py").write_text(SLOWER_RUNTIME)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(slower), os.environ.get("PYTHONPATH")])))
    quiet = pytester.runpytest_subprocess(*args)
    with _orphan_burners(2, 120):
        busy = pytester.runpytest_subprocess(*args)
    for result in (quiet, busy):
        assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()[-3000:]
        result.stdout.fnmatch_lines(["*decode_cpu_us grew *%: * us vs baseline * us (limit +15%)*"])
        grew = float(result.stdout.str().split("decode_cpu_us grew ")[1].split("%")[0])
        assert 15 < grew < 40, grew  # measured about as planted
    busy.stdout.fnmatch_lines(["*gate decode_tps:-15% not decided: other processes used *"])


def _baseline(busy: float | None = None) -> bench.RunRecord:
    details = {} if busy is None else {"busy_cpus": busy}
    return bench.RunRecord("base", "m", "f", "int4", {"decode_tps": 100.0, "peak_rss_mb": 70.0}, details=details)


@pytest.mark.parametrize(
    ("now", "then", "undecided"),
    [
        (0.1, 0.0, []),
        (0.1, None, []),
        (1.9, 0.0, ["decode_tps"]),
        (0.0, 1.2, ["decode_tps"]),
        (2.0, 2.0, ["decode_tps"]),
    ],
)
def test_a_busy_run_or_baseline_leaves_only_the_timing_gates_undecided(
    now: float, then: float | None, undecided: list[str]
) -> None:
    gates = [bench.Gate.parse("decode_tps:-15%"), bench.Gate.parse("peak_rss_mb:+25%")]
    found = bench.busy_gates(gates, now, _baseline(then))
    assert [gate.metric for gate, _ in found] == undecided
    assert all("not decided: other processes used" in reason for _, reason in found)


@pytest.mark.parametrize(
    ("metrics", "busy", "strict", "status"),
    [
        ({"decode_tps": 99.0, "peak_rss_mb": 70.0}, 0.0, False, "passed"),
        ({"decode_tps": 80.0, "peak_rss_mb": 70.0}, 0.0, False, "failed"),
        ({"decode_tps": 80.0, "peak_rss_mb": 70.0}, 1.5, False, "inconclusive"),  # the busy run decides no timing
        ({"decode_tps": 80.0, "peak_rss_mb": 70.0}, 1.5, True, "failed"),  # --slm-fail-inconclusive
        ({"decode_tps": 99.0, "peak_rss_mb": 99.0}, 1.5, False, "failed"),  # memory is judged on a busy run
        ({"decode_tps": 99.0}, 0.0, False, "failed"),  # a gate this run has no figure for
    ],
)
def test_judge_gives_one_verdict_for_all_gates(
    metrics: dict[str, float], busy: float, strict: bool, status: str
) -> None:
    gates = [bench.Gate.parse("decode_tps:-15%"), bench.Gate.parse("peak_rss_mb:+25%")]
    verdict = bench.judge(gates, metrics, _baseline(), busy_cpus=busy, fail_inconclusive=strict)
    assert verdict.status == status, verdict


def test_undecided_memory_verdicts_are_not_called_timing() -> None:
    """Issue 21, item 11: the step summary listed memory verdicts under "timing verdicts"."""
    from pytest_slmdeploy.report import FAMILY_PROPERTY, INCONCLUSIVE_PROPERTY

    report = RunReport(model={"name": "m"})
    memory = [(FAMILY_PROPERTY, "memory"), (INCONCLUSIVE_PROPERTY, "replay of system prompt: RSS rose, not steadily")]
    report.record("t::leak", "call", "passed", memory)
    markdown = report.to_markdown()
    assert "Verdicts this run's evidence could not decide (timing, memory; not failures):" in markdown
    assert "timing verdicts" not in markdown.lower()


def test_cpu_time_per_token_is_judged_on_a_busy_run() -> None:
    gates = [bench.Gate.parse("decode_tps:-15%"), bench.Gate.parse("decode_cpu_us:+15%")]
    assert [gate.metric for gate, _ in bench.busy_gates(gates, 2.0, _baseline())] == ["decode_tps"]


def test_a_gate_the_baseline_predates_is_undecided_and_one_this_run_lacks_is_not() -> None:
    gates = [bench.Gate.parse(g) for g in ("decode_tps:-15%", "decode_cpu_us:+15%", "ttft_ms:+25%")]
    current = {"decode_tps": 99.0, "decode_cpu_us": 40.0}  # ttft_ms missing here: evaluate_gates fails it
    ((gate, reason),) = bench.gates_the_baseline_predates(gates, current, _baseline())
    assert gate.metric == "decode_cpu_us"
    assert reason.startswith("gate decode_cpu_us:+15% not decided: the baseline run 'base' of ")
    assert reason.endswith("has no decode_cpu_us (save a new baseline with --slm-bench-save)")


BURN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def _orphan_burners(count: int, seconds: float) -> Iterator[None]:
    """CPU-bound processes that are not this one's descendants (their shell parent exits at once), as another
    job on the same machine would be; killed on the way out."""
    burn = f"{shlex.quote(sys.executable)} -c {shlex.quote(BURN.format(seconds=seconds))}"
    pids = [
        int(subprocess.run(["sh", "-c", f"{burn} >/dev/null 2>&1 & echo $!"], check=True, capture_output=True,
                           text=True).stdout)
        for _ in range(count)
    ]  # fmt: skip
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_other_load_counts_other_processes_and_not_this_ones_children() -> None:
    from pytest_slmdeploy.measure import OtherLoad

    load = OtherLoad()
    with _orphan_burners(1, 1.5):
        time.sleep(1.5)
        others = load.cpus()
    load = OtherLoad()
    child = subprocess.Popen([sys.executable, "-c", BURN.format(seconds=1.5)])
    child.wait()
    own = load.cpus()
    assert others >= 0.6, others
    assert own < others - 0.5, (own, others)  # the same work, done by a child of this process


def test_a_healthy_model_on_a_busy_machine_does_not_fail_its_timing_gates(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Non-negotiable 6: a baseline saved on a quiet machine, the same healthy model gated beside two CPU-bound
    processes. Its decode speed falls with the load, which says nothing about the model: the timing gates read
    inconclusive (a failure only with --slm-fail-inconclusive); the memory gate and the gate on CPU time per
    decoded token (the work, which the load does not move) are still judged, and pass."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    args = ("--slm-model", str(tiny_model), "--slm-cache", str(warm_cache), "-m", "slm_benchmark",
            "-p", "no:cacheprovider", "--slm-bench-history", str(tmp_path / "history"),
            "--rootdir", str(pytester.path))  # fmt: skip
    pytester.runpytest_subprocess(*args, "--slm-bench-save", "--slm-bench-name", "base").assert_outcomes(
        passed=2, skipped=1
    )
    with _orphan_burners(2, 120):
        busy = pytester.runpytest_subprocess(*args, "--slm-bench-baseline=base", "--slm-bench-save")
        strict = pytester.runpytest_subprocess(*args, "--slm-bench-baseline=base", "--slm-fail-inconclusive")
    assert busy.ret == pytest.ExitCode.OK, busy.stdout.str()[-3000:]
    busy.stdout.fnmatch_lines(
        [
            "inconclusive (not a failure): Benchmark: gate decode_tps:-15% not decided: other processes used *CPUs "
            "during this run's timed tests",
            "inconclusive (not a failure): Benchmark: gate ttft_ms:+25% not decided: *",
            "benchmark gates not decided against 'base'; benchmark gates passed against 'base' (*): "
            "decode_cpu_us *, peak_rss_mb *",
        ]
    )
    assert "benchmark gate FAILED" not in busy.stdout.str()
    assert strict.ret == pytest.ExitCode.TESTS_FAILED, strict.stdout.str()[-3000:]
    strict.stdout.fnmatch_lines(["*gate decode_tps:-15% not decided: other processes used *"])
    saved = [json.loads(line) for line in (tmp_path / "history").glob("*.jsonl").__next__().read_text().splitlines()]
    assert saved[-1]["details"]["busy_cpus"] >= 0.5  # the record says so
