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


@pytest.mark.parametrize(("rounds", "verdict"), [(3, "inconclusive"), (5, "inconclusive"), (6, "fail")])
def test_a_decided_failure_needs_rounds_a_sign_test_supports(rounds: int, verdict: str) -> None:
    """Issue 21, item 0: 3 interleaved rounds, all over the allowed value, were a decided failure (the bootstrap
    has 10 distinct resamples of 3 rounds); an exact sign test on 3 of 3 gives p = 0.125. The healthy tiny
    model failed the length sweep so under load."""
    short = [36.4e-6, 35.1e-6, 38.0e-6, 36.0e-6, 37.2e-6, 35.5e-6][:rounds]
    long = [697e-6, 640e-6, 720e-6, 660e-6, 700e-6, 690e-6][:rounds]
    result = compare(short, long, factor=2, slack=500e-6, what="time per decoded token")
    assert result.excess_low > 0  # the bootstrap alone would decide
    assert result.verdict == verdict, result.explain()
    if verdict == "inconclusive":
        assert f"{rounds} of {rounds} rounds over the allowed value: sign test p = " in result.explain()


def test_a_pass_needs_rounds_a_sign_test_supports() -> None:
    a = [1.0, 1.01, 0.99]
    assert compare(a, [x * 1.01 for x in a], factor=1.05).verdict == "inconclusive"
    assert compare(a * 2, [x * 1.01 for x in a * 2], factor=1.05).verdict == "pass"
    # One round in six over: 5 of 6 within gives p = 0.11, not yet a pass.
    assert compare(a * 2, [*[x * 1.01 for x in a * 2][:5], 1.2], factor=1.05).verdict == "inconclusive"
