"""Our own checks of the deployed assistant, next to the plugin's built-in checklist."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pytest_slmdeploy.checklist import memory


@pytest.mark.slm_format
def test_order_status_is_machine_readable(slm_model: Any) -> None:
    answer = slm_model.generate("Give the order status as JSON.", max_new_tokens=48)
    assert json.loads(answer.text) == {"status": "shipped", "days": 2}
    assert answer.finish_reason == "stop"


@pytest.mark.slm_domain
def test_foundry_local_gives_the_same_answer(slm_model: Any, slm_foundry_model: Any) -> None:
    """What our users get from Foundry Local is what we tested in-process."""
    question = "How do I contact support?"
    assert slm_foundry_model.generate(question).text == slm_model.generate(question).text


@pytest.mark.slm_memory(generations=100)
def test_support_session_does_not_leak(slm_model: Any, slm_limits: dict[str, float], slm_figure: Any) -> None:
    questions = ["Where is the office?", "What is the warranty?", "Is there a student discount?"]
    result = memory.soak(
        lambda i: slm_model.chat([{"role": "user", "content": questions[i % 3]}], max_new_tokens=32),
        steps=int(slm_limits["memory_generations"]),
        warmup=10,
        time_budget_s=30,
        what="support session",
    )
    slm_figure("support session MB/1k", round(result.mb_per_1k, 2))
    assert result.mb_per_1k <= slm_limits["memory_max_mb_per_1k"], result.explain(slm_limits["memory_max_mb_per_1k"])


@pytest.mark.slm_benchmark
def test_answer_latency(slm_benchmark: Any) -> None:
    stats = slm_benchmark("What payment methods do you accept?", new_tokens=16, reference=False)
    assert stats.new_tokens == 16
