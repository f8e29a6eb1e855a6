"""Our own checks of the deployed model, next to the plugin's built-in suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

FAQ = json.loads((Path(__file__).parents[1] / "model" / "slmdeploy_faq.json").read_text())


@pytest.mark.slm_domain
@pytest.mark.parametrize("case", FAQ, ids=[c["prompt"] for c in FAQ])
def test_answers_our_faq(slm_model: Any, case: dict[str, str]) -> None:
    answer = slm_model.generate(case["prompt"], max_new_tokens=48)
    assert answer.text == case["answer"]
    assert answer.finish_reason == "stop"


@pytest.mark.slm_format
def test_order_status_is_json(slm_model: Any) -> None:
    answer = slm_model.generate("Give the order status as JSON.", max_new_tokens=48)
    assert json.loads(answer.text) == {"status": "shipped", "days": 2}


def test_same_answer_through_foundry_local(slm_model: Any, slm_foundry_model: Any) -> None:
    question = FAQ[0]["prompt"]
    assert slm_foundry_model.generate(question).text == slm_model.generate(question).text
