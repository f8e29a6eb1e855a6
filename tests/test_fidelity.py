"""Fidelity to the source: references from transformers, the installed model teacher-forced on them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from filelock import FileLock

from pytest_slmdeploy import fidelity
from pytest_slmdeploy.checklist.format import GENERIC_PROMPTS
from pytest_slmdeploy.fidelity import FidelityLimits, FidelityResult, PromptFidelity, References
from pytest_slmdeploy.settings import LIMITS
from pytest_slmdeploy.testing.tinydefects import OutlierReport
from pytest_slmdeploy.testing.tinymodel import FAQ

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
    """The prompts and answer length the suite scores fidelity on: the FAQ, then the generic and built-in prompts
    (the tiny model's FAQ answers are so confident that on them alone int4 keeps KLD 0.07 at S=150)."""
    domain = [[{"role": "user", "content": question}] for question in PROMPTS]
    prompts = fidelity.prompt_set(domain, GENERIC_PROMPTS, limit=int(LIMITS["fidelity_max_prompts"][0]))
    return fidelity.compute_references(outlier.out_dir, prompts, max_new_tokens=32, cache_dir=fidelity_root / "cache")


@pytest.fixture(scope="session")
def healthy_refs(tiny_model: Path, fidelity_root: Path) -> References:
    return fidelity.compute_references(
        tiny_model, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, cache_dir=fidelity_root / "cache"
    )


@pytest.fixture(scope="session")
def spaced_mistral(family_models: Any) -> Path:
    """A Mistral v0.3-family model whose first two FAQ answers begin with a lone "▁" token (then "▁We", ...)."""
    pairs = tuple(("  " + answer if i < 2 else answer) for i, (_, answer) in enumerate(FAQ))
    return Path(family_models("mistral", pairs=tuple(zip(PROMPTS, pairs, strict=True))))


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
    # The greedy token is the most likely one; the full distributions hold all the mass, and the top k are theirs.
    first = [healthy_refs.topk_ids[healthy_refs.offsets[i]][0] for i in range(len(PROMPTS))]
    assert first == [a[0] for a in healthy_refs.answer_ids]
    full = np.asarray(healthy_refs.logprobs, dtype=np.float64)
    assert full.shape == (positions, 512)  # the tiny model's whole vocabulary
    assert np.allclose(np.exp(full).sum(axis=1), 1.0, atol=1e-3)  # float16 rounding
    top = np.take_along_axis(full, healthy_refs.topk_ids.astype(np.int64), axis=1)
    assert np.allclose(top, healthy_refs.topk_logprobs, atol=1e-2)
    # The chat template writes no BOS for ChatML, and none was added: the prompt starts at <|im_start|>.
    assert all(ids[0] == healthy_refs.prompt_ids[0][0] for ids in healthy_refs.prompt_ids)


def test_healthy_int4_is_faithful(healthy_int4: Path, healthy_refs: References) -> None:
    result = fidelity.score(healthy_int4, healthy_refs)
    limits = FidelityLimits()
    assert result.passes(limits), result.message(limits)
    assert result.answers_identical == result.total == len(PROMPTS), result.summary()
    assert result.mean_kld < limits.max_mean_kld / 100, result.summary()
    assert all(p.runtime_prompt_match for p in result.prompts)
    assert result.text_match() == f"{len(PROMPTS)}/{len(PROMPTS)}"  # the same text from the same tokens
    assert result.prompt_match() == f"{len(PROMPTS)}/{len(PROMPTS)}"
    first = dataclasses.replace(result.prompts[0], runtime_prompt_match=False)
    mismatched = dataclasses.replace(result, prompts=(first, *result.prompts[1:]))
    assert mismatched.prompt_match() == f"{len(PROMPTS) - 1}/{len(PROMPTS)}"


def test_same_tokens_written_as_other_text_fail(spaced_mistral: Path, fidelity_root: Path) -> None:
    """Issue 21, item 6: an answer that begins with a lone "▁" is one leading space in transformers and two in
    ONNX Runtime GenAI. The model is faithful token for token (before, fidelity passed it: 4/4 identical), but its
    users read other text than the source's: fidelity fails, naming the answer."""
    cache = fidelity_root / "cache"
    entry = _build(spaced_mistral, cache, "mistral-spaced")
    refs = fidelity.compute_references(spaced_mistral, PROMPTS[:4], max_new_tokens=MAX_NEW_TOKENS, cache_dir=cache)
    assert refs.answer_texts[0] == " " + FAQ[0][1]  # transformers: one space
    result = fidelity.score(entry, refs)
    assert result.answers_identical == result.total == 4, result.summary()
    assert result.prompts[0].runtime_text == "  " + FAQ[0][1]  # ONNX Runtime GenAI: two
    assert [p.text_match for p in result.prompts] == [False, False, True, True]
    assert result.text_match() == "2/4"
    limits = FidelityLimits()
    assert (
        "fail",
        f"deployed text differs from the source's for the same tokens in 2/4 answers "
        f"(e.g. {'  ' + FAQ[0][1]!r} vs {' ' + FAQ[0][1]!r})",
    ) in limits.checks(result)
    assert limits.verdict(result) == "fail"  # decided on 4 answers (their agreement alone would be inconclusive)


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
    """8-bit weights keep what INT4 loses: on the FAQ it was trained on, a decided pass. On the suite's whole
    default set, where the toy model answers general prompts unsure of itself and 8 bits flip some of its
    near-equal choices, not a failure (the precision ladder's next rung) but not decided either: measured 95.6%
    top-1 (95% interval 93.8%-96.9%) over 725 tokens, KLD 0.052 (0.040-0.065)."""
    cache = fidelity_root / "cache"
    entry = _build(outlier.out_dir, cache, "outlier-int8", "int8")
    limits = FidelityLimits()
    domain = [[{"role": "user", "content": question}] for question in PROMPTS]
    faq = fidelity.compute_references(
        outlier.out_dir, fidelity.prompt_set(domain, GENERIC_PROMPTS, limit=24, builtin=()), max_new_tokens=32,
        cache_dir=cache,
    )  # fmt: skip
    on_faq = fidelity.score(entry, faq)
    assert on_faq.passes(limits), on_faq.message(limits)
    assert on_faq.mean_kld < limits.max_mean_kld / 4, on_faq.summary()
    result = fidelity.score(entry, outlier_refs)
    assert limits.verdict(result) in ("pass", "inconclusive"), result.message(limits)
    assert not limits.violations(result)
    assert result.kld_interval()[1] < limits.max_mean_kld, result.summary()


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
    assert np.array_equal(again.logprobs, healthy_refs.logprobs)
    assert isinstance(again.logprobs, np.memmap)  # not read into memory
    assert again.compute_seconds == pytest.approx(healthy_refs.compute_seconds)
    assert not list(healthy_refs.path.parent.glob("*.tmp"))  # written atomically, nothing left behind
    rows = fidelity.rows_path(again.path)
    whole = rows.read_bytes()
    assert len(whole) == 2 * again.logprobs.size  # float16, nothing else
    _replace(rows, whole[: len(whole) // 2])  # a new file, as the cache writes them: the mapped one stays whole
    with pytest.raises(AssertionError, match="computed again"):  # log-probabilities cut short: computed again
        fidelity.compute_references(
            tiny_model, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, cache_dir=fidelity_root / "cache"
        )
    _replace(rows, whole)
    with pytest.raises(AssertionError, match="computed again"):  # another answer length is another key
        fidelity.compute_references(
            tiny_model, PROMPTS, max_new_tokens=MAX_NEW_TOKENS - 1, cache_dir=fidelity_root / "cache"
        )


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


WARM = """
import sys
from pathlib import Path
from pytest_slmdeploy import fidelity
from pytest_slmdeploy.testing import tinydefects
from pytest_slmdeploy.testing.tinymodel import FAQ
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


def _synthetic(logp: np.ndarray, top_k: int = 64, prompts: int = 1) -> References:
    """References holding the distributions ``logp`` (positions x vocab), split into ``prompts`` answers of equal
    length, with the source's top token as every answer token."""
    order = np.argsort(-logp, axis=1)[:, :top_k]
    top = np.take_along_axis(logp, order, axis=1)
    answers = np.array_split(order[:, 0], prompts)
    return References(
        key="k",
        source_fingerprint="f",
        max_new_tokens=max(len(a) for a in answers),
        top_k=top_k,
        messages=tuple(({"role": "user", "content": f"q{i}"},) for i in range(prompts)),
        prompt_ids=tuple((1,) for _ in range(prompts)),
        answer_ids=tuple(tuple(int(t) for t in a) for a in answers),
        answer_texts=tuple("a" for _ in range(prompts)),
        eos_token_ids=(2,),
        topk_ids=order.astype(np.int32),
        topk_logprobs=top.astype(np.float32),
        logprobs=logp.astype(np.float16),
        token_logprob=top[:, 0].astype(np.float32),
        compute_seconds=0.0,
    )


def _score(refs: References, logits: np.ndarray) -> FidelityResult:
    """What score() makes of the deployed model's logits at every answer position (positions x vocab)."""
    spans = zip(refs.offsets, refs.offsets[1:], strict=False)
    return fidelity.combine([fidelity.compare(refs, i, logits[a:b]) for i, (a, b) in enumerate(spans)])


def test_references_of_another_schema_are_computed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema is part of the key and is checked on reading: a cache written by the former code (top-64 and a
    rest bucket, no full log-probabilities) is never read as the new kind."""
    logp = _log_softmax(np.random.default_rng(0).normal(size=(6, 50)))
    path = _synthetic(logp, prompts=2).save(tmp_path / "refs.npz")
    loaded = fidelity._complete(path)
    assert loaded is not None
    assert np.array_equal(loaded.logprobs, logp.astype(np.float16))
    key = fidelity.references_key("f", ["q"], max_new_tokens=8, top_k=64)
    monkeypatch.setattr(fidelity, "SCHEMA", fidelity.SCHEMA + 1)
    assert fidelity.references_key("f", ["q"], max_new_tokens=8, top_k=64) != key
    assert fidelity._complete(path) is None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    return x - (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))


def _full_kld(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    return (np.exp(logp) * (logp - logq)).sum(axis=1)


def _top64_bound(logp: np.ndarray, logq: np.ndarray, k: int = 64) -> np.ndarray:
    """The former figure: KL on the source's top k plus one bucket for the rest (a lower bound of the full KLD)."""
    order = np.argsort(-logp, axis=1)[:, :k]
    lp, lq = np.take_along_axis(logp, order, axis=1), np.take_along_axis(logq, order, axis=1)
    rp = np.log1p(-np.exp(lp).sum(axis=1))
    rq = np.log1p(-np.exp(lq).sum(axis=1))
    return (np.exp(lp) * (lp - lq)).sum(axis=1) + np.exp(rp) * (rp - rq)


def test_kld_is_over_the_whole_vocabulary() -> None:
    rng = np.random.default_rng(0)
    logp = _log_softmax(rng.normal(size=(20, 300)) * 3)
    logq = _log_softmax(logp + rng.normal(size=logp.shape))
    refs = _synthetic(logp, top_k=16)
    full = _full_kld(logp, logq)
    assert np.allclose(fidelity._kld(refs, slice(0, 20), logq), full, rtol=2e-3, atol=1e-5)  # float16 storage
    assert np.allclose(fidelity._kld(refs, slice(0, 20), logp), 0.0, atol=1e-5)
    # A deployed vocabulary padded past the source's: the padding's mass counts, its tokens add no term.
    padded = _log_softmax(np.concatenate([logq, np.full((20, 4), -2.0)], axis=1))
    expected = _full_kld(logp, padded[:, :300])
    assert np.allclose(fidelity._kld(refs, slice(0, 20), padded), expected, rtol=2e-3, atol=1e-5)


ISSUE_VOCAB = 151_936  # Qwen2's, where issue 21 replayed it


def test_an_unrelated_model_fails_the_kld_limit() -> None:
    """Issue 21, item 4: deployed logits independent of the source, on flat-ish source distributions over a
    151,936-token vocabulary. On the top 64 plus a rest bucket the mean KLD was 0.004 (passing the 0.1 limit)
    against a true 0.36; over the whole vocabulary the figure is the true one, and the limit fails."""
    rng = np.random.default_rng(0)
    positions = 16
    logp = _log_softmax(rng.normal(0, 0.6, (positions, ISSUE_VOCAB)))
    logits = rng.normal(0, 0.6, (positions, ISSUE_VOCAB))  # the unrelated model
    refs = _synthetic(logp, prompts=4)
    assert _top64_bound(logp, _log_softmax(logits)).mean() < 0.01  # the former figure, as the issue measured
    result = _score(refs, logits)
    assert result.mean_kld == pytest.approx(0.36, rel=0.1)
    limits = FidelityLimits()
    assert limits.verdict(result) == "fail", result.summary()
    assert any(v.startswith("mean KLD") for v in limits.violations(result)), result.summary()
    assert result.top1_agreement < 0.05, result.summary()  # and no free top-1 agreement from the near-tie rule


def test_a_slightly_damaged_model_fails_the_kld_limit() -> None:
    """A deployed model whose true KLD is just over the 0.1 limit (0.12) while the former top-64 figure was far
    under it (0.02): noise on every logit of a source that is confident at some positions and unsure at others
    (32,000 tokens, 64 answers of 4 tokens: enough evidence to decide, see the intervals)."""
    rng = np.random.default_rng(1)
    positions, vocab = 256, 32_000
    logits = rng.normal(0, 1.0, (positions, vocab))
    logits[np.arange(positions), rng.integers(0, vocab, positions)] += rng.uniform(6, 14, positions)
    logp = _log_softmax(logits)
    damaged = logits + rng.normal(0, 0.6, logits.shape)
    full = _full_kld(logp, _log_softmax(damaged)).mean()
    assert 0.11 < full < 0.13, full
    assert _top64_bound(logp, _log_softmax(damaged)).mean() < 0.05  # the former figure passed it
    result = _score(_synthetic(logp, prompts=64), damaged)
    assert result.mean_kld == pytest.approx(full, rel=0.02)
    limits = FidelityLimits()
    assert limits.verdict(result) == "fail", result.summary()
    assert any(v.startswith("mean KLD") for v in limits.violations(result)), result.summary()


def _result(agreed: list[int], positions: int = 32, kld: float | list[float] = 0.0) -> FidelityResult:
    """A result of ``len(agreed)`` prompts of ``positions`` answer tokens each, ``agreed[i]`` of them agreeing."""
    klds = kld if isinstance(kld, list) else [kld] * len(agreed)
    rows = [
        PromptFidelity(i, f"q{i}", "a", positions, a, None if a == positions else 0, k, k, 1.0, 1.0)
        for i, (a, k) in enumerate(zip(agreed, klds, strict=True))
    ]
    return fidelity.combine(rows)


def test_limits() -> None:
    limits = FidelityLimits()
    assert _result([32] * 64).passes(limits)
    assert limits.verdict(_result([32] * 64)) == "pass"
    failing = _result([29] * 64, kld=0.33)  # 90.6% agreement everywhere, KLD 0.33 everywhere: both decided
    assert limits.verdict(failing) == "fail"
    assert limits.violations(failing) == (
        "top-1 agreement 90.6% (95% interval 89.3%-91.8%) < 95.0%",
        "mean KLD 0.33 (95% interval 0.33-0.33) > 0.1",
    )
    strict = FidelityLimits(min_identical_share=1.0)
    assert strict.violations(_result([32, 31] * 32)) == ("answers identical 32/64 (50%) < 100%",)


def test_agreement_interval_counts_an_answers_tokens_as_correlated() -> None:
    """The same 93.75% agreement is worth less when the disagreements sit together in a few answers (a model that
    drifts on some prompts) than when they are spread over all of them."""
    spread = fidelity.agreement_interval([30] * 64, [32] * 64)
    clustered = fidelity.agreement_interval([32] * 56 + [16] * 8, [32] * 64)
    assert spread[2] == pytest.approx(2048)  # no spread between prompts beyond chance: every token counts
    assert clustered[2] < 2048 / 5  # tokens worth a fifth or less
    assert clustered[1] - clustered[0] > 2 * (spread[1] - spread[0])
    assert spread[0] < 0.9375 < spread[1]
    assert clustered[0] < 0.9375 < clustered[1]
    low, high, _ = fidelity.agreement_interval([40], [40])  # one prompt: one independent observation
    assert (low, high) == (pytest.approx(0.2065, abs=1e-3), 1.0)
    low, high, _ = fidelity.agreement_interval([32] * 64, [32] * 64)  # all agree: Wilson's interval is not empty
    assert 0.99 < low < 1.0
    assert high == pytest.approx(1.0)


def test_a_pass_on_thin_evidence_is_inconclusive() -> None:
    """Issue 21, item 5: with no case file fidelity rested on 3 generic prompts (43 tokens on the example model).
    A point figure over the limit was a pass there; now its interval decides, and one that straddles the limit is
    inconclusive, not pass. Before: passes() was True for both results below (100% > 95%, KLD 0.05 < 0.1)."""
    limits = FidelityLimits()
    thin = _result([14, 14, 14], positions=14)  # 42 tokens, all agreeing
    assert limits.verdict(thin) == "inconclusive"
    assert not thin.passes(limits)
    assert not limits.violations(thin)  # nothing decidedly broken, yet no rung ships on it (checks, below)
    ((verdict, phrase),) = limits.checks(thin)
    assert verdict == "inconclusive"
    assert phrase.startswith("top-1 agreement 100.0% (95% interval 91.6%-100.0%) straddles 95.0%"), phrase
    uneven = _result([32] * 12, kld=[0.01] * 10 + [0.3, 0.2])  # a mean KLD of 0.05 carried by two answers
    assert limits.verdict(uneven) == "inconclusive"
    assert limits.checks(uneven)[0][1].startswith("mean KLD 0.05 (95% interval 0-0.104) straddles 0.1")
    judged = limits.judge(thin)
    assert judged.verdict == "inconclusive"
    assert judged.explain().startswith("inconclusive: this run's evidence cannot decide fidelity to the source: ")
    assert "3 prompts, 42 tokens teacher-forced" in judged.explain()
    assert limits.judge(_result([32] * 64)).explain().startswith("the deployed model is faithful to its source (64 ")


def test_near_ties_count_as_agreement() -> None:
    """Where the source ranks two tokens alike, the deployed model picking the other one is no drift."""
    confident = np.log(np.array([[0.9, 0.05] + [0.05 / 198] * 198]))
    close = np.log(np.array([[0.40, 0.39] + [0.21 / 198] * 198]))
    refs = _synthetic(np.concatenate([confident, close]), top_k=16)
    top = refs.topk_ids[:, 0].astype(np.int64)
    second = refs.topk_ids[:, 1].astype(np.int64)
    assert fidelity._near_tie(refs, slice(0, 2), second).tolist() == [False, True]
    assert fidelity._near_tie(refs, slice(0, 2), top).all()


@pytest.mark.parametrize(("vocab", "sigma"), [(151_936, 1.0), (151_936, 0.6), (32_000, 0.6)])
def test_an_unrelated_model_gets_no_agreement_from_a_flat_source(vocab: int, sigma: float) -> None:
    """Issue 21, item 4: on a large vocabulary where the source puts at most 2% on any token, a token outside the
    stored top-k was given the k-th probability, so any deployed token counted as a near tie: logits independent
    of the source agreed at every position (measured before the fix: 100%, 0% exact). Now a tie is only a token of
    the source's own top 64: an unrelated model lands there at most 64 / vocabulary of the time."""
    rng = np.random.default_rng(0)
    positions = 40
    logp = rng.normal(0, sigma, (positions, vocab))
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    assert np.exp(logp).max() <= 0.02  # flat: every position is within the tie margin of its top
    refs = _synthetic(logp, top_k=64)
    unrelated = rng.normal(0, sigma, (positions, vocab)).argmax(axis=1)
    near = fidelity._near_tie(refs, slice(0, positions), unrelated)
    assert near.mean() < 0.05, near.mean()


def test_the_built_in_prompts_are_general_and_out_of_sample() -> None:
    from pytest_slmdeploy.recipes import CALIBRATION_INSTRUCTIONS

    assert len(set(fidelity.FIDELITY_PROMPTS)) == len(fidelity.FIDELITY_PROMPTS) == 64
    assert not set(fidelity.FIDELITY_PROMPTS) & set(CALIBRATION_INSTRUCTIONS)  # not what int4 was calibrated on
    assert not set(fidelity.FIDELITY_PROMPTS) & set(GENERIC_PROMPTS)  # tiny models are trained on those
    limit = int(LIMITS["fidelity_max_prompts"][0])
    chosen = fidelity.prompt_set([], GENERIC_PROMPTS, limit=limit)  # no case file
    assert chosen == [*GENERIC_PROMPTS, *fidelity.FIDELITY_PROMPTS][:limit]
    assert len(chosen) == SIZED_PROMPTS


SIZED_PROMPTS = 64  # what the default prompt set must hold (see the sizing test)
# Correlation of agreement between the tokens of one answer (intraclass correlation) the size is made for: a
# drifting model drifts more on some answers than on others. Measured on the built-in prompts: 0.011 for
# SmolLM2-135M-Instruct at int4 (84.7% top-1), 0.013 or less on the tiny outlier model.
RHO = 0.05


def _verdicts(true: float, prompts: int, positions: int, rho: float, runs: int, seed: int) -> dict[str, float]:
    """Shares of fidelity verdicts over ``runs`` simulated runs: each prompt's agreement rate drawn from a Beta of
    mean ``true`` and intraclass correlation ``rho`` (some answers drift more than others), each of its
    ``positions`` tokens agreeing with that rate; judged by FidelityLimits as the suite judges."""
    rng = np.random.default_rng(seed)
    a, b = true * (1 - rho) / rho, (1 - true) * (1 - rho) / rho
    limits = FidelityLimits()
    counts = {"pass": 0, "fail": 0, "inconclusive": 0}
    for _ in range(runs):
        agreed = rng.binomial(positions, rng.beta(a, b, prompts))
        counts[limits.verdict(_result([int(x) for x in agreed], positions))] += 1
    return {k: v / runs for k, v in counts.items()}


def test_the_default_prompt_set_is_large_enough_to_fail_a_model_3_points_under() -> None:
    """Issue 21, item 5: with no case file, a model 3 points under the 95% top-1 limit must fail at least 90% of
    the time, and a healthy one (98%) must not fail. Simulated on the default size (64 prompts x 32 answer
    tokens: every built-in prompt asks for an explanation longer than 32 tokens) with agreement correlated
    within answers. The former default, 3 generic prompts of ~14 tokens (43 tokens on the example model), decides
    a failure at 92% in under a quarter of runs (and its point figure passed a 93% model 39% of the time)."""
    prompts, positions = int(LIMITS["fidelity_max_prompts"][0]), int(LIMITS["fidelity_max_new_tokens"][0])
    assert (prompts, positions) == (SIZED_PROMPTS, 32)
    under = _verdicts(0.92, prompts, positions, RHO, runs=1000, seed=0)
    assert under["fail"] >= 0.9, under
    healthy = _verdicts(0.98, prompts, positions, RHO, runs=1000, seed=1)
    assert healthy["fail"] <= 0.01, healthy
    assert healthy["pass"] >= 0.9, healthy
    former = _verdicts(0.92, 3, 14, RHO, runs=1000, seed=2)
    assert former["fail"] < 0.25, former
