"""Unit tests of the timing statistics: interleaved rounds and the paired bootstrap verdict."""

from __future__ import annotations

import random

import pytest

from pytest_slmdeploy.stats import compare, interleaved


def test_clear_pass_and_fail() -> None:
    a = [1.0 + 0.01 * i for i in range(10)]
    assert compare(a, [x * 1.02 for x in a], factor=1.05).verdict == "pass"
    assert compare(a, [x * 1.20 for x in a], factor=1.05).verdict == "fail"
    assert compare(a, [x * 1.20 for x in a], factor=1.05, slack=0.5).verdict == "pass"  # absolute slack counts


def test_noise_wider_than_the_margin_is_inconclusive() -> None:
    rng = random.Random(1)
    a = [1.0 * rng.uniform(0.3, 3.0) for _ in range(8)]
    b = [1.05 * rng.uniform(0.3, 3.0) for _ in range(8)]
    result = compare(a, b, factor=1.0, what="noisy")
    assert result.verdict == "inconclusive"
    assert result.explain().startswith("inconclusive: noisy")
    assert "straddles 0" in result.explain()


def test_paired_rounds_cancel_load_shared_by_both_conditions() -> None:
    # Each round's load hits A and B alike (interleaving); B is truly 10% slower.
    load = [1, 1, 8, 1, 3, 1, 1, 6, 1, 2, 1, 1]
    a = [0.010 * f for f in load]
    b = [0.011 * f for f in load]
    assert compare(a, b, factor=1.05).verdict == "fail"
    assert compare(a, b, factor=1.2).verdict == "pass"


def test_compare_needs_paired_rounds() -> None:
    with pytest.raises(ValueError, match="same number of rounds"):
        compare([1.0], [1.0, 2.0])


def test_interleaved_order_and_stopping() -> None:
    order: list[str] = []
    samples = interleaved(
        [lambda: order.append("a") or 1.0, lambda: order.append("b") or 2.0],
        min_rounds=3,
        max_rounds=10,
        budget_s=60,
        decided=lambda runs: len(runs[0]) >= 4,
    )
    assert order[:4] == ["a", "b", "a", "b"]
    assert samples == [[1.0] * 4, [2.0] * 4]
    never = interleaved([lambda: 0.0], min_rounds=2, max_rounds=5, budget_s=60, decided=lambda runs: False)
    assert len(never[0]) == 5
    spent = interleaved([lambda: 0.0], min_rounds=2, max_rounds=50, budget_s=0.0)
    assert len(spent[0]) == 2  # the budget never cuts below the minimum
