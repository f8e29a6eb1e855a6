"""The plugin's own overhead: its generate() loop against a bare onnxruntime_genai loop on the same model.

This is the project's concern, not a user's gate: measured here, reported as a figure
(``record_property``, so JUnit carries it), and failed only when the interleaved rounds
decide that the plugin is slower by more than the budget (DESIGN: within 5%).
"""

from __future__ import annotations

from pathlib import Path
from statistics import median

import pytest

from pytest_slmdeploy.bench import bare_decode
from pytest_slmdeploy.runtime import open_model
from pytest_slmdeploy.stats import compare, interleaved

MAX_OVERHEAD = 0.05
NEW_TOKENS = 32


def test_plugin_decodes_as_fast_as_a_bare_loop(warm_cache: Path, record_property: pytest.RecordProperty) -> None:
    model = open_model("ort-genai", warm_cache / "custom" / "faq-int4", cache_root=warm_cache, model_name="faq-int4")
    backend = model.backend
    prompt_ids = backend.encode(backend.render("Hello"))  # type: ignore[attr-defined]
    native = backend.model  # type: ignore[attr-defined]

    def bare() -> float:
        """Seconds per token after the first, as onnxruntime-genai's own benchmark loop decodes."""
        count, seconds = bare_decode(native, prompt_ids, NEW_TOKENS)
        return seconds / count

    def ours() -> float:
        answer = model.generate("Hello", max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        return 1 / answer.decode_tokens_per_s

    def judge(runs: list[list[float]]) -> str:
        return compare(runs[0], runs[1], factor=1 + MAX_OVERHEAD, what="plugin vs bare, s/token").verdict

    try:
        for _ in range(3):
            bare(), ours()
        runs = interleaved(
            [bare, ours], min_rounds=15, max_rounds=60, budget_s=20, decided=lambda r: judge(r) != "inconclusive"
        )
    finally:
        model.close()
    result = compare(runs[0], runs[1], factor=1 + MAX_OVERHEAD, what="plugin vs bare, s/token")
    ratio = median(runs[0]) / median(runs[1])  # decode speed of the plugin over the bare loop
    record_property("plugin_vs_bare_decode", round(ratio, 4))
    record_property("plugin_vs_bare_verdict", result.explain())
    print(f"plugin/bare decode speed {ratio:.3f}: {result.explain()}")
    assert result.verdict != "fail", result.explain()
