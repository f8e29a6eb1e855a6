"""Benchmarks: statistics, history, direction-aware gates, export, and the pytest run end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pytest_slmdeploy import bench
from pytest_slmdeploy.errors import SettingsError
from pytest_slmdeploy.runtime import Generation

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _record(name: str, created: float, **metrics: float) -> bench.RunRecord:
    return bench.RunRecord(name=name, model="m", fingerprint="f", precision="int4", metrics=metrics, created_at=created)


def test_stats_of_generations() -> None:
    runs = [Generation("x", 100, 33, "length", ttft, ttft + 0.32, ()) for ttft in (0.1, 0.2, 0.3)]
    stats = bench.GenerationStats.of(runs, peak_rss=200_000_000, cpu_percent=150.0)
    assert stats.ttft_ms == 200.0
    assert stats.prefill_tps == 500.0  # 100 prompt tokens / 0.2 s
    assert stats.decode_tps == 100.0  # 32 tokens after the first in 0.32 s
    assert stats.e2e_ms == 520.0
    assert stats.peak_rss_mb == 200.0
    assert bench.spread([1.0, 1.0, 1.0, 1.0]) == 0.0
    assert bench.spread([90.0, 100.0, 110.0, 120.0]) == pytest.approx(0.19, abs=0.01)


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


def test_github_action_benchmark_export() -> None:
    exported = bench.github_action_benchmark({"decode_tps": 30.0, "ttft_ms": 190.0, "unknown": 1.0}, "m")
    assert exported["customBiggerIsBetter"] == [{"name": "m decode_tps", "unit": "tokens/s", "value": 30.0}]
    assert exported["customSmallerIsBetter"] == [{"name": "m ttft_ms", "unit": "ms", "value": 190.0}]


def test_plot(tmp_path: Path) -> None:
    records = [_record(f"v{i}", float(i), decode_tps=100.0 + i, ttft_ms=10.0) for i in range(3)]
    out = bench.plot_history(records, ["decode_tps", "ttft_ms"], tmp_path / "history.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bytes_read_per_token_leaves_out_the_embedding_table(warm_cache: Path) -> None:
    entry = warm_cache / "custom" / "faq-int4"
    weights = sum(p.stat().st_size for p in entry.glob("*.onnx*"))
    assert bench.bytes_read_per_token(entry) == weights - 512 * 64 * 4


def test_bandwidth_efficiency() -> None:
    assert bench.bandwidth_efficiency(decode_tps=10.0, bytes_per_token=1_000_000_000, bandwidth=20e9) == 50.0
    assert bench.memory_bandwidth_bytes_per_s(size_mb=16, repeats=2) > 1e8


def test_benchmarks_record_history_and_gate(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path, tmp_path: Path
) -> None:
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
    assert {"decode_tps", "ttft_ms", "prefill_tps", "peak_rss_mb", "model_mb", "build_s"} <= set(record["metrics"])
    assert record["machine"]["cpu_count"] >= 1
    benchmarks = json.loads((pytester.path / "bench.json").read_text())["benchmarks"]
    tokens = sorted(b["extra_info"]["prompt_tokens"] for b in benchmarks)
    assert len(tokens) == 2
    assert 8 < tokens[0] <= 16 < 100 < tokens[1] <= 128
    assert all("decode_tps" in b["extra_info"] for b in benchmarks)
    assert json.loads((pytester.path / "gab.json").read_text())["customBiggerIsBetter"]

    impossible = dict(record, metrics={**record["metrics"], "decode_tps": record["metrics"]["decode_tps"] * 10})
    (tmp_path / "fast.json").write_text(json.dumps(impossible))
    gated = pytester.runpytest_subprocess(*args, "--slm-bench-baseline", str(tmp_path / "fast.json"))
    assert gated.ret == pytest.ExitCode.TESTS_FAILED
    gated.stdout.fnmatch_lines(
        [
            "benchmark gate FAILED: decode_tps dropped *%: * tokens/s vs baseline * tokens/s (limit -15%); "
            "baseline run 'base'*"
        ]
    )
