"""Fidelity to the source: references from transformers, the installed model teacher-forced on them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from pytest_slmdeploy import fidelity
from pytest_slmdeploy.checklist.format import GENERIC_PROMPTS
from pytest_slmdeploy.fidelity import FidelityLimits, FidelityResult, PromptFidelity, References
from pytest_slmdeploy.tinydefects import OutlierReport
from pytest_slmdeploy.tinymodel import FAQ

PROMPTS = [question for question, _ in FAQ]
MAX_NEW_TOKENS = 48


def _build(model: Path, cache: Path, name: str, precision: str = "int4") -> Path:
    from pytest_slmdeploy.deploy import deploy, prepare
    from pytest_slmdeploy.settings import Settings

    with FileLock(str(cache) + ".lock"):
        return deploy(prepare(Settings(model=model, cache_dir=cache, name=name, precision=precision))).entry_dir


@pytest.fixture(scope="session")
def healthy_int4(tiny_model: Path, warm_cache: Path) -> Path:
    return _build(tiny_model, warm_cache, "faq-int4")  # conftest's warm cache already holds it


@pytest.fixture(scope="session")
def outlier_int4(outlier: OutlierReport, fidelity_root: Path) -> Path:
    return _build(outlier.out_dir, fidelity_root / "cache", "outlier-int4")


@pytest.fixture(scope="session")
def outlier_refs(outlier: OutlierReport, fidelity_root: Path) -> References:
    """The prompts and answer length the suite scores fidelity on: the FAQ, then the generic prompts (the tiny
    model's FAQ answers are so confident that on them alone int4 keeps KLD 0.07 at S=150; 0.14 with these)."""
    domain = [[{"role": "user", "content": question}] for question in PROMPTS]
    prompts = fidelity.prompt_set(domain, GENERIC_PROMPTS, limit=24)
    return fidelity.compute_references(outlier.out_dir, prompts, max_new_tokens=32, cache_dir=fidelity_root / "cache")


@pytest.fixture(scope="session")
def healthy_refs(tiny_model: Path, fidelity_root: Path) -> References:
    return fidelity.compute_references(
        tiny_model, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, cache_dir=fidelity_root / "cache"
    )


def test_outliers_leave_fp32_unchanged(outlier: OutlierReport) -> None:
    assert outlier.channels == (3, 19, 35, 51)
    assert len(outlier.projections) == 10  # q, k, v, gate, up in each of the 2 layers (the LM head left alone)
    assert outlier.max_abs_logit_diff < 1e-4 * outlier.max_abs_logit


def test_references(healthy_refs: References) -> None:
    assert healthy_refs.prompts == tuple(PROMPTS)
    assert all(healthy_refs.stopped)
    assert healthy_refs.answer_texts == tuple(answer for _, answer in FAQ)  # the model was trained on them
    positions = sum(len(a) for a in healthy_refs.answer_ids)
    assert healthy_refs.topk_ids.shape == (positions, fidelity.DEFAULT_TOP_K)
    # The greedy token is the most likely one, and the top-k plus the rest bucket hold all the mass.
    first = [healthy_refs.topk_ids[healthy_refs.offsets[i]][0] for i in range(len(PROMPTS))]
    assert first == [a[0] for a in healthy_refs.answer_ids]
    mass = np.exp(healthy_refs.topk_logprobs.astype(np.float64)).sum(axis=1) + np.exp(healthy_refs.rest_logprob)
    assert np.allclose(mass, 1.0, atol=1e-5)
    # The chat template writes no BOS for ChatML, and none was added: the prompt starts at <|im_start|>.
    assert all(ids[0] == healthy_refs.prompt_ids[0][0] for ids in healthy_refs.prompt_ids)


def test_healthy_int4_is_faithful(healthy_int4: Path, healthy_refs: References) -> None:
    result = fidelity.score(healthy_int4, healthy_refs)
    limits = FidelityLimits()
    assert result.passes(limits), result.message(limits)
    assert result.answers_identical == result.total == len(PROMPTS), result.summary()
    assert result.mean_kld < limits.max_mean_kld / 100, result.summary()
    assert all(p.runtime_prompt_match for p in result.prompts)
    assert result.prompt_match() == f"{len(PROMPTS)}/{len(PROMPTS)}"
    first = dataclasses.replace(result.prompts[0], runtime_prompt_match=False)
    mismatched = dataclasses.replace(result, prompts=(first, *result.prompts[1:]))
    assert mismatched.prompt_match() == f"{len(PROMPTS) - 1}/{len(PROMPTS)}"


def test_outlier_int4_drifts(outlier_int4: Path, outlier_refs: References) -> None:
    refs = outlier_refs
    result = fidelity.score(outlier_int4, refs)
    limits = FidelityLimits()
    broken = limits.violations(result)
    assert any(b.startswith("mean KLD") for b in broken), f"expected the mean KLD limit broken: {result.summary()}"
    assert result.answers_identical < result.total, result.summary()
    worst = result.worst(2)
    deployed = fidelity.deployed_answers(outlier_int4, refs, [p.index for p in worst])
    message = result.message(limits, deployed)
    assert message.startswith("the deployed model drifted from its source: ")
    assert worst[0].prompt in message
    assert worst[0].reference_answer in message
    assert repr(deployed[worst[0].index]) in message
    assert deployed[worst[0].index] != worst[0].reference_answer


def test_outlier_int8_is_faithful(outlier: OutlierReport, outlier_refs: References, fidelity_root: Path) -> None:
    """8-bit weights keep what INT4 loses: the precision ladder's next faithful rung passes."""
    entry = _build(outlier.out_dir, fidelity_root / "cache", "outlier-int8", "int8")
    result = fidelity.score(entry, outlier_refs)
    limits = FidelityLimits()
    assert result.passes(limits), result.message(limits)
    assert result.mean_kld < limits.max_mean_kld / 4, result.summary()


def test_references_are_reused(
    tiny_model: Path, healthy_refs: References, fidelity_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert healthy_refs.path is not None
    assert healthy_refs.path.is_file()
    stamp = healthy_refs.path.stat().st_mtime_ns

    def no_compute(*args: object, **kwargs: object) -> References:
        raise AssertionError("references were computed again")

    monkeypatch.setattr(fidelity, "_compute", no_compute)
    again = fidelity.compute_references(
        tiny_model, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, cache_dir=fidelity_root / "cache"
    )
    assert again.loaded
    assert again.path == healthy_refs.path
    assert again.path.stat().st_mtime_ns == stamp
    assert again.answer_ids == healthy_refs.answer_ids
    assert np.array_equal(again.topk_logprobs, healthy_refs.topk_logprobs)
    assert again.compute_seconds == pytest.approx(healthy_refs.compute_seconds)
    assert not list(healthy_refs.path.parent.glob("*.tmp"))  # written atomically, nothing left behind
    with pytest.raises(AssertionError, match="computed again"):  # another answer length is another key
        fidelity.compute_references(
            tiny_model, PROMPTS, max_new_tokens=MAX_NEW_TOKENS - 1, cache_dir=fidelity_root / "cache"
        )


WARM = """
import sys
from pathlib import Path
from pytest_slmdeploy import fidelity, tinydefects
from pytest_slmdeploy.tinymodel import FAQ
refs = fidelity.compute_references(
    Path(sys.argv[1]), [q for q, _ in FAQ], max_new_tokens=int(sys.argv[3]), cache_dir=Path(sys.argv[2])
)
result = fidelity.score(Path(sys.argv[4]), refs)
print(refs.loaded, result.answers_identical, sorted({"torch", "transformers"} & set(sys.modules)))
"""


def test_a_warm_run_does_not_import_torch(
    tiny_model: Path, healthy_refs: References, healthy_int4: Path, fidelity_root: Path
) -> None:
    args = [tiny_model, fidelity_root / "cache", MAX_NEW_TOKENS, healthy_int4]
    done = subprocess.run(
        [sys.executable, "-c", WARM, *map(str, args)], capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == f"True {len(PROMPTS)} []"


def _synthetic(logp: np.ndarray, top_k: int) -> References:
    """References holding the distributions ``logp`` (positions x vocab), with token 0 as every answer token."""
    order = np.argsort(-logp, axis=1)[:, :top_k]
    top = np.take_along_axis(logp, order, axis=1)
    with np.errstate(divide="ignore"):
        rest = (
            np.log1p(-np.minimum(np.exp(top).sum(axis=1), 1.0)) if top_k < logp.shape[1] else np.full(len(top), -np.inf)
        )
    return References(
        key="k",
        source_fingerprint="f",
        max_new_tokens=logp.shape[0],
        top_k=top_k,
        messages=(({"role": "user", "content": "q"},),),
        prompt_ids=((1,),),
        answer_ids=(tuple(int(t) for t in order[:, 0]),),
        answer_texts=("a",),
        eos_token_ids=(2,),
        topk_ids=order.astype(np.int32),
        topk_logprobs=top.astype(np.float32),
        rest_logprob=rest.astype(np.float32),
        token_logprob=top[:, 0].astype(np.float32),
        compute_seconds=0.0,
    )


def test_kld_on_the_top_k_support_is_a_lower_bound() -> None:
    rng = np.random.default_rng(0)
    p = rng.normal(size=(20, 300)) * 3
    q = p + rng.normal(size=p.shape)
    logp = p - np.log(np.exp(p).sum(axis=1, keepdims=True))
    logq = q - np.log(np.exp(q).sum(axis=1, keepdims=True))
    full = (np.exp(logp) * (logp - logq)).sum(axis=1)
    refs = _synthetic(logp, top_k=16)
    bound = fidelity._kld(refs, slice(0, 20), logq)
    assert np.all(bound <= full + 1e-6)
    assert np.all(bound > 0)
    assert np.allclose(fidelity._kld(refs, slice(0, 20), logp), 0.0, atol=1e-6)
    whole = fidelity._kld(_synthetic(logp, top_k=300), slice(0, 20), logq)  # all tokens kept: the full KLD
    assert np.allclose(whole, full, rtol=1e-4)


def _result(top1: float = 1.0, mean_kld: float = 0.0, max_kld: float = 0.0, ppl: float = 1.0) -> FidelityResult:
    row = PromptFidelity(0, "q", "a", 4, 4, None, 0.0, 0.0, 1.0, 1.0)
    rows = (row, dataclasses.replace(row, index=1, first_divergence=2))
    return FidelityResult(rows, top1, mean_kld, max_kld, ppl, score_seconds=0.0)


def test_limits() -> None:
    limits = FidelityLimits()
    assert _result().passes(limits)
    assert limits.violations(_result(top1=0.9, mean_kld=0.33)) == (
        "top-1 agreement 90.0% < 95.0%",
        "mean KLD 0.33 > 0.1",
    )
    strict = FidelityLimits(min_identical_share=1.0)
    assert strict.violations(_result(max_kld=2.0, ppl=1.5)) == ("answers identical 1/2 (50%) < 100%",)


def test_near_ties_count_as_agreement() -> None:
    """Where the source ranks two tokens alike, the deployed model picking the other one is no drift."""
    confident = np.log(np.array([[0.9, 0.05] + [0.05 / 198] * 198]))
    close = np.log(np.array([[0.40, 0.39] + [0.21 / 198] * 198]))
    refs = _synthetic(np.concatenate([confident, close]), top_k=16)
    top = refs.topk_ids[:, 0].astype(np.int64)
    second = refs.topk_ids[:, 1].astype(np.int64)
    assert fidelity._near_tie(refs, slice(0, 2), second).tolist() == [False, True]
    assert fidelity._near_tie(refs, slice(0, 2), top).all()


def test_an_unrelated_model_gets_no_agreement_from_a_flat_source() -> None:
    """Issue 21, item 4: on a large vocabulary where the source puts at most 2% on any token, a token outside the
    stored top-k was given the k-th probability, so any deployed token counted as a near tie: logits independent
    of the source agreed at every position (measured before the fix: 100%, 0% exact)."""
    rng = np.random.default_rng(0)
    vocab, positions = 151_936, 40
    logp = rng.normal(0, 1.0, (positions, vocab))
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    assert np.exp(logp).max() <= 0.02  # flat: every position is within the tie margin of its top
    refs = _synthetic(logp, top_k=64)
    unrelated = rng.normal(0, 1.0, (positions, vocab)).argmax(axis=1)
    near = fidelity._near_tie(refs, slice(0, positions), unrelated)
    assert near.mean() < 0.05, near.mean()
