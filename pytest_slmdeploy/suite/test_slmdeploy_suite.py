"""The built-in suite, collected when ``--slm-model`` is set (turn off with ``--slm-no-suite``).

One test per claim of the tutorial's checklist; limits come from ``slm_*`` ini keys
(see ``pytest --help``) and marker keywords.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from statistics import median
from typing import Any

import pytest

from pytest_slmdeploy.checklist import edge, lengths, memory
from pytest_slmdeploy.checklist import format as fmt
from pytest_slmdeploy.errors import ContextOverflowError
from pytest_slmdeploy.foundry import is_foundry_entry
from pytest_slmdeploy.stash import slm_session
from pytest_slmdeploy.stats import Comparison, interleaved

SMOKE_PROMPT = "Hello"
# Unusual characters, not length, are the edge family's question (lengths asks that one): 100 characters of
# random unicode are already up to a few hundred tokens, and prefill costs as much as decoding on a CPU.
EDGE_MAX_CHARS = 100
BENCH_PROMPT_TOKENS = (16, 128, 512)  # also the length sweep's points where they fit: measured once for both
REFERENCE_PROMPT_TOKENS = 128  # the length whose figures go into the history and gates
# Generations of each kind's memory replay at least: a flat RSS (sampled after malloc_trim) settles Sen's 95%
# interval of the slope within the limit from 6 samples on; a rising one goes on to the budget.
MIN_REPLAY = 5
# Untimed load/unload cycles first: through Foundry Local's SDK, RSS grows over the first reloads and then levels
# (SmolLM2 int4-mixed: 102.8 -> 133.7 MB over 10 reloads, +3 MB over the next 15); ONNX Runtime GenAI's is flat.
RELOAD_WARMUP = {"ort-genai": 2, "foundry": 10}


def _domain_cases(request: pytest.FixtureRequest, limit: int = 16) -> list[Any]:
    """The domain cases collected in this run (the model's own domain), as :class:`~.cases.Case`."""
    from pytest_slmdeploy.items import CaseItem

    name = slm_session(request.config).name
    items = request.session.items
    return [item.case for item in items if isinstance(item, CaseItem) and item.model in (None, name)][:limit]


# -- deployment ---------------------------------------------------------------------------------
@pytest.mark.slm_smoke
def test_installed_in_foundry_local_cache(slm_deployment: Any, slm_cache: Any) -> None:
    """The entry is what Foundry Local's scanner accepts, and no file changed since install."""
    assert is_foundry_entry(slm_deployment.entry_dir), f"{slm_deployment.entry_dir} is not a Foundry Local model"
    state = slm_cache.check(slm_deployment.name, deep=True)
    assert state.usable, f"cache entry {slm_deployment.name}: {state.reason}"


@pytest.mark.slm_smoke
def test_model_loads_and_answers(slm_model: Any, slm_figure: Any) -> None:
    """The installed model loads in the configured backend and generates."""
    answer = slm_model.generate(SMOKE_PROMPT, max_new_tokens=32)
    slm_figure("ttft_s", round(answer.ttft_s, 4))
    assert answer.prompt_tokens > 0
    assert answer.finish_reason in ("stop", "length")
    assert answer.total_s > 0


@pytest.mark.slm_smoke
def test_foundry_local_loads_and_answers(slm_foundry_model: Any, slm_deployment: Any) -> None:
    """Foundry Local (its SDK, in-process) registers, loads and runs the installed model."""
    registration = slm_foundry_model.backend.registration
    assert registration.model_path == slm_deployment.entry_dir
    answer = slm_foundry_model.generate(SMOKE_PROMPT, max_new_tokens=32)
    assert answer.prompt_tokens > 0, "Foundry Local did not read the prompt"
    assert answer.finish_reason in ("stop", "length")


# -- 1. domain -----------------------------------------------------------------------------------
@pytest.mark.slm_domain
def test_domain_cases_exist(slm_target: Any) -> None:
    """Only collected when the run holds no domain case: says how to add them, and counts as skipped."""
    pytest.skip(
        "no domain cases: put slm_cases.yaml in the model folder or slm_cases*.yaml among your tests "
        "(see docs/checklist.md)"
    )


# -- 2. format -----------------------------------------------------------------------------------
@pytest.mark.slm_format
def test_answers_stop_and_are_clean(
    request: pytest.FixtureRequest, slm_model: Any, slm_deployment: Any, slm_limits: dict[str, float], slm_figure: Any,
    slm_verdict: Any,
) -> None:  # fmt: skip
    """Answers end because the model stopped (the share decided on its 95% interval), leak no special/template
    tokens, are non-empty UTF-8, do not loop."""
    special = fmt.SpecialTokens.from_model_dir(slm_deployment.entry_dir)
    max_new = int(slm_limits["format_max_new_tokens"])
    # The domain cases' own answers (shared with the domain family: generated once), then the built-in prompts.
    asked: list[tuple[str, Any, int, bool]] = [
        (case.messages[-1]["content"], list(case.messages), case.max_tokens, case.expects_limit)
        for case in _domain_cases(request)
    ]
    asked += [(prompt, prompt, max_new, False) for prompt in (*fmt.GENERIC_PROMPTS, *fmt.STOP_PROMPTS)]
    answer = getattr(slm_model, "answer", slm_model.generate)  # a wrapper of slm_model may only generate
    results = [fmt.check_format(label, answer(prompt, max_new_tokens=limit), special, require_stop=False)
               for label, prompt, limit, _ in asked]  # fmt: skip
    # Every answer counts at its own limit: a case's limit is the answer length its author expects. Only a case
    # that declares running to its limit (finish-reason: length) is no evidence either way.
    judged = [r for r, (*_, expects_limit) in zip(results, asked, strict=True) if not expects_limit]
    stops = fmt.StopRate(tuple(judged), slm_limits["format_min_stop_rate"])
    slm_figure("stop rate", stops.figure())
    problems = [r.explain() for r in results if not r.passed]
    assert not problems, "format problems:\n" + "\n".join(problems)
    slm_verdict([stops])  # a failure fails; too few answers to decide is reported inconclusive


@pytest.mark.slm_format
def test_prompt_template_matches_the_model(slm_model: Any, slm_deployment: Any, slm_figure: Any) -> None:
    """inference_model.json's PromptTemplate gives the same prompt tokens as the model's own chat template."""
    from pytest_slmdeploy.source import read_chat_template

    backend = slm_model.backend
    if not hasattr(backend, "encode"):
        pytest.skip(f"comparing prompt tokens needs a backend that tokenizes ({backend.name} does not)")
    parts = json.loads((slm_deployment.entry_dir / "inference_model.json").read_text())["PromptTemplate"]
    chat_template, tokenizer_config = read_chat_template(slm_deployment.entry_dir)
    assert chat_template is not None, f"{slm_deployment.entry_dir} has lost its chat template"
    slm_figure("conversations", ", ".join(fmt.template_conversations(parts)))
    mismatches = fmt.prompt_template_mismatches(parts, chat_template, tokenizer_config, backend.render, backend.encode)
    assert not mismatches, "PromptTemplate renders other tokens than the chat template:\n" + "\n".join(mismatches)


# -- 4. input lengths ----------------------------------------------------------------------------
@pytest.mark.slm_lengths
def test_every_length_works_and_scales(
    request: pytest.FixtureRequest, slm_model: Any, slm_limits: dict[str, float], slm_figure: Any, slm_verdict: Any
) -> None:
    """Prompts from a few tokens up to the context each get an answer; TTFT grows at most linearly and the
    time per token holds, judged on interleaved rounds against the noise seen in this run."""
    backend = slm_model.backend
    context = getattr(backend, "context_length", None)
    if context is None or not hasattr(backend, "encode"):
        pytest.skip("measuring prompt lengths needs the ort-genai backend")
    targets = lengths.sweep_lengths(context, max_tokens=int(slm_limits["lengths_max_tokens"]),
                                    points=int(slm_limits["lengths_points"]), anchors=BENCH_PROMPT_TOKENS)  # fmt: skip
    prompts = [lengths.prompt_of_tokens(t, lambda text: len(backend.encode(backend.render(text)))) for t in targets]
    new_tokens = int(slm_limits["lengths_new_tokens"])
    answers = [slm_model.generate(p, max_new_tokens=new_tokens) for p in prompts]
    problems = lengths.answer_problems(answers)
    assert not problems, "; ".join(problems)

    def timed(prompt: str) -> Callable[[], Any]:
        return lambda: slm_model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def compare(runs: list[list[Any]]) -> list[Comparison]:
        return lengths.compare_lengths(
            runs,
            ttft_tolerance=slm_limits["lengths_ttft_tolerance"],
            ttft_slack_s=slm_limits["lengths_ttft_slack_ms"] / 1000,
            decode_band=slm_limits["lengths_decode_band"],
            decode_slack_s=slm_limits["lengths_decode_slack_ms"] / 1000,
        )

    # The answers above were the warm-up: the first run at a new length allocates.
    runs = interleaved(
        [timed(p) for p in prompts],
        min_rounds=int(slm_limits["lengths_min_rounds"]),
        max_rounds=int(slm_limits["lengths_max_rounds"]),
        budget_s=slm_limits["lengths_seconds"],
        decided=lambda runs: all(c.verdict != "inconclusive" for c in compare(runs)),
    )
    slm_figure("TTFT ms by length", ", ".join(f"{r[0].prompt_tokens}:{median(g.ttft_s for g in r) * 1000:.1f}"
                                              for r in runs))  # fmt: skip
    slm_figure("timing rounds", len(runs[0]))
    session = slm_session(request.config)
    for prompt, samples in zip(prompts, runs, strict=True):  # the benchmarks ask the same at 16 and 512 tokens
        session.shared_runs[(prompt, new_tokens)] = list(samples)
    slm_verdict(compare(runs))


@pytest.mark.slm_lengths
def test_context_boundary_is_handled(
    slm_model: Any, slm_deployment: Any, slm_limits: dict[str, float], slm_figure: Any
) -> None:
    """The deployed context is the source's; one token over it gets the documented ContextOverflowError (checked
    before any prefill, so on every model); and, where the context fits ``slm_lengths_max_tokens``, a prompt
    that leaves room for one token gets at most that token (the runtime at a full context)."""
    backend = slm_model.backend
    context = getattr(backend, "context_length", None)
    if context is None or not hasattr(backend, "encode"):
        pytest.skip("the context length is known with the ort-genai backend")
    source_config = json.loads((slm_deployment.entry_dir / "config.json").read_text())
    text_config = source_config.get("text_config") or source_config
    declared = text_config.get("max_position_embeddings")
    if isinstance(declared, int):
        assert context == declared, f"deployed context {context} tokens, the source's config.json says {declared}"

    def count(text: str) -> int:
        return len(backend.encode(backend.render(text)))

    over = lengths.FILLER
    while count(over) <= context:  # doubling: a few encodes even for a 128k context
        over += over
    with pytest.raises(ContextOverflowError, match="the model's context is"):
        slm_model.generate(over, max_new_tokens=4)
    longest = int(slm_limits["lengths_max_tokens"])
    if context > longest:  # a full 32k context would take minutes of prefill on a CPU
        slm_figure("context boundary", f"{context} tokens as the source; over it refused; a full context not tried "
                   f"(over slm_lengths_max_tokens = {longest})")  # fmt: skip
        return
    prompt = lengths.prompt_of_tokens(context - 1, count)
    answer = slm_model.generate(prompt, max_new_tokens=8)
    room = context - answer.prompt_tokens
    assert answer.new_tokens + (answer.finish_reason == "stop") <= room, (
        f"{answer.prompt_tokens} prompt tokens + {answer.new_tokens} new tokens overflow the {context}-token context"
    )
    assert answer.finish_reason in ("stop", "length")
    with pytest.raises(ContextOverflowError, match="the model's context is"):
        slm_model.generate(prompt + " and more words to overflow", max_new_tokens=4)
    slm_figure("context boundary", f"{context} tokens as the source; full context and over it checked")


# -- 5. edge cases -------------------------------------------------------------------------------
@pytest.mark.slm_edge
def test_unusual_prompts_get_answers(
    slm_model: Any, slm_deployment: Any, slm_limits: dict[str, float], slm_figure: Any
) -> None:
    """Hypothesis-generated prompts (empty, whitespace, unicode, emoji, RTL, control chars, NUL, template tokens)
    each get an answer; only a prompt over the context may be refused (ContextOverflowError), and an empty one
    by a runtime that documents it (EmptyPromptError: Foundry Local)."""
    from hypothesis import HealthCheck, given, settings

    special = fmt.SpecialTokens.from_model_dir(slm_deployment.entry_dir)
    tried: list[edge.EdgeOutcome] = []

    @settings(max_examples=int(slm_limits["edge_examples"]), derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(prompt=edge.prompts_strategy(special.texts, max_chars=EDGE_MAX_CHARS))
    def check(prompt: str) -> None:
        tried.append(edge.survive(slm_model.generate, prompt, max_new_tokens=8))

    check()
    slm_figure("edge prompts tried", len(tried))
    slm_figure("refused (over the context, or empty)", sum(o.refused is not None for o in tried))
    assert tried
    assert all(o.passed for o in tried), edge.explain_problems(tried)


@pytest.mark.slm_edge
def test_sampling_settings_reach_the_runtime(slm_model: Any) -> None:
    """A seed repeats its answer; several seeds at a high temperature do not all give the greedy answer."""
    temperature = min(5.0, getattr(slm_model.backend, "max_temperature", 5.0))  # Foundry Local allows up to 2
    check = edge.check_sampling(slm_model.generate, SMOKE_PROMPT, temperature=temperature)
    assert not check.problems, "; ".join(check.problems)


# -- 6. fidelity to the source ------------------------------------------------------------------
@pytest.mark.slm_fidelity
def test_faithful_to_the_source(
    slm_fidelity: Any, slm_deployment: Any, slm_limits: dict[str, float], slm_figure: Any, slm_verdict: Any,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """Teacher-forced on the source model's greedy answers (domain cases, then built-in prompts), the installed
    model ranks the source's tokens first and keeps its next-token distributions (top-1 agreement, mean KLD), each
    decided on its 95% interval (one that straddles its limit is inconclusive), and writes the same tokens as the
    same text."""
    from pytest_slmdeploy import bench, fidelity

    result = slm_fidelity()
    limits = fidelity.FidelityLimits.of(slm_limits)
    low, high = result.top1_interval()
    kld_low, kld_high = result.kld_interval()
    slm_figure("evidence", result.evidence())  # what every verdict rests on (issue 21, item 5)
    slm_figure("answers identical", f"{result.answers_identical}/{result.total}")
    slm_figure("top-1 agreement %", round(result.top1_agreement * 100, 2))
    slm_figure("top-1 95% interval %", f"{low * 100:.1f}-{high * 100:.1f}")
    slm_figure("exact top-1 %", round(result.top1_exact * 100, 2))
    slm_figure("mean KLD", float(f"{result.mean_kld:.3g}"))
    slm_figure("mean KLD 95% interval", f"{kld_low:.3g}-{kld_high:.3g}")
    slm_figure("max KLD", float(f"{result.max_kld:.3g}"))
    slm_figure("perplexity ratio", round(result.perplexity_ratio, 4))
    slm_figure("deployed prompt ids as source", result.prompt_match())  # shown on a pass too (issue 21, item 6)
    slm_figure("deployed answer text as source", result.text_match())  # same tokens, same text (issue 21, item 6)
    request.node.user_properties.append((f"{bench.BENCH_PREFIX}top1_agreement", round(result.top1_agreement * 100, 2)))
    request.node.user_properties.append((f"{bench.BENCH_PREFIX}mean_kld", float(f"{result.mean_kld:.4g}")))
    judged = limits.judge(result)
    if judged.verdict == "fail":
        worst = [p.index for p in result.worst(3)]
        threads = slm_session(request.config).settings.threads
        answers = fidelity.deployed_answers(slm_deployment.entry_dir, slm_fidelity.references, worst, threads=threads)
        judged = limits.judge(result, answers)
    slm_verdict([judged])  # a failure fails; an undecided verdict is reported inconclusive, as timing's are


# -- benchmark -----------------------------------------------------------------------------------


@pytest.mark.slm_benchmark
@pytest.mark.parametrize("prompt_tokens", BENCH_PROMPT_TOKENS)
def test_benchmark_generation(
    prompt_tokens: int, slm_model: Any, slm_deployment: Any, slm_limits: dict[str, float], slm_figure: Any,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """TTFT, prefill and decode tokens/s, latency, peak RSS and CPU at a prompt length, in pytest-benchmark."""
    backend = slm_model.backend
    new_tokens = int(slm_limits["benchmark_new_tokens"])
    context = getattr(backend, "context_length", None)
    if context is not None and prompt_tokens + new_tokens > context:
        pytest.skip(f"{prompt_tokens} + {new_tokens} tokens do not fit the {context}-token context")
    if hasattr(backend, "encode"):
        prompt = lengths.prompt_of_tokens(prompt_tokens, lambda text: len(backend.encode(backend.render(text))))
    else:
        prompt = lengths.FILLER * max(1, prompt_tokens // 10)
    reference = prompt_tokens == REFERENCE_PROMPT_TOKENS
    slm_benchmark = request.getfixturevalue("slm_benchmark")  # after the skip: pytest-benchmark warns on unused
    shared = slm_session(request.config).shared_runs.get((prompt, new_tokens), [])
    stats = slm_benchmark(prompt, new_tokens=new_tokens, reference=reference, prompt_tokens=prompt_tokens,
                          shared=shared)  # fmt: skip
    slm_figure(f"decode tok/s @{prompt_tokens}", stats.decode_tps)
    intervals = f"intervals: decode {stats.decode_interval:.1%}, TTFT {stats.ttft_interval:.1%}"
    slm_figure(f"rounds @{prompt_tokens}", f"{slm_benchmark.taken.describe()}; {intervals}")
    assert stats.new_tokens == new_tokens, f"the answer length was not fixed: {stats.new_tokens} tokens"
    assert stats.decode_tps > 0
    assert stats.ttft_ms > 0
    if reference:
        from pytest_slmdeploy import bench

        per_token, cache = bench.bytes_read_per_token(slm_deployment.entry_dir), bench.last_level_cache_bytes()
        if per_token <= cache:  # decoding reads the weights from the cache: no memory bound to compare with
            slm_figure("bandwidth efficiency", f"n/a: {per_token / 1e6:.2g} MB read per token fit the "
                                                 f"{cache / 2**20:g} MiB CPU cache")  # fmt: skip
            return
        threads = slm_session(request.config).settings.threads or os.cpu_count() or 1  # the runtime's threads
        bandwidth = bench.memory_bandwidth_bytes_per_s(threads)
        efficiency = bench.bandwidth_efficiency(stats.decode_tps, per_token, bandwidth)
        request.node.user_properties.append((f"{bench.BENCH_PREFIX}bandwidth_efficiency", round(efficiency, 2)))
        slm_figure("bandwidth efficiency %", round(efficiency, 1))
        slm_figure("read bandwidth", f"{bandwidth / 1e9:.1f} GB/s on {threads} threads, {per_token / 1e6:.0f} MB/token")


# -- 3. memory: last, so every generation of the session is evidence ------------------------
@pytest.mark.slm_memory
def test_no_leak_over_many_generations(
    request: pytest.FixtureRequest,
    slm_model: Any,
    slm_deployment: Any,
    slm_limits: dict[str, float],
    slm_figure: Any,
    slm_verdict: Any,
) -> None:
    """RSS has no upward trend, judged on the session's own requests: a steady rise across the session's
    generations (every family's, after warm-up) is evidence, and each kind of request the session made (system
    prompt, multi-turn, sampled, prompt and answer lengths, a test's first generation) is replayed in a soak of
    its own and judged per generation and per token (runs last, to see every other generation)."""
    loaded = slm_session(request.config).model()  # the log is the loaded model's, under any wrapper of slm_model
    warmup = int(slm_limits["memory_warmup"])
    _every_kind_of_request(request, slm_model, slm_deployment, loaded.requests)
    session_log = list(loaded.memory_log)
    kinds = memory.request_kinds(session_log, loaded.requests)
    per_generation = slm_limits["memory_max_mb_per_1k"] * 1e6 / 1000
    per_token = slm_limits["memory_max_bytes_per_token"]
    # Each kind gets an equal share of the budget and of the generations, and at least MIN_REPLAY generations.
    steps = max(MIN_REPLAY, int(slm_limits["memory_generations"]) // max(1, len(kinds)))
    seconds = slm_limits["memory_seconds"] / max(1, len(kinds))
    backend = slm_model.backend
    # The Foundry backend's special-token audit replays answers: one generation would be several requests.
    audit = getattr(backend, "audit_special_tokens", None)
    if audit is not None:
        backend.audit_special_tokens = False
    replays = []
    try:
        for kind in kinds:
            limit, text = memory.kind_limit(per_generation, per_token, kind.tokens)
            replay = _replay(slm_model, loaded, kind, limit, text, steps=steps, seconds=seconds)
            if replay.verdict == "fail":  # a leak rises again when the same kind is replayed once more
                again = _replay(slm_model, loaded, kind, limit, text, steps=steps, seconds=seconds)
                replay = memory.confirmed(replay, again)
            replays.append(replay)
    finally:
        if audit is not None:
            backend.audit_special_tokens = audit
    session = memory.SoakResult("session's generations", memory.session_series(session_log, warmup=warmup), 0.0)
    verdict = memory.decide(session.judged(per_generation, f"{per_generation / 1e3:g} kB per generation"), replays)
    slm_figure("leak MB/1k generations", round(verdict.result.mb_per_1k, 3))
    slm_figure("decided by", verdict.result.what)
    replayed = sum(v.result.steps - 1 for v in replays)
    slm_figure("generations", f"{max(0, session.steps - 1)} judged in the session (slope {session.mb_per_1k:.3g} "
                              f"MB/1k), {replayed} replayed over {len(kinds)} kinds of request")  # fmt: skip
    slm_verdict([verdict])


def _every_kind_of_request(
    request: pytest.FixtureRequest, slm_model: Any, slm_deployment: Any, made: Mapping[str, Any]
) -> None:
    """Make sure the session made every kind of request at least once, whichever families ran: the domain cases,
    the built-in prompts, the conversations the PromptTemplate expresses (system prompt, multi-turn), a sampled
    answer, a long answer and a long prompt; those already ``made`` are not sent again."""
    from pytest_slmdeploy.runtime import GenerationOptions, request_key

    parts = json.loads((slm_deployment.entry_dir / "inference_model.json").read_text())["PromptTemplate"]
    asked: list[tuple[Any, dict[str, Any]]] = [
        (list(case.messages), {"max_new_tokens": case.max_tokens}) for case in _domain_cases(request)
    ]
    asked += [(prompt, {"max_new_tokens": 16}) for prompt in fmt.GENERIC_PROMPTS]
    asked += [(messages, {"max_new_tokens": 32}) for messages in fmt.template_conversations(parts).values()]
    asked.append((SMOKE_PROMPT, {"max_new_tokens": 32, "do_sample": True, "top_k": 20, "top_p": 0.9, "seed": 7}))
    long_answer = 3 * memory.LONG_ANSWER
    asked.append((SMOKE_PROMPT, {"max_new_tokens": long_answer, "min_new_tokens": long_answer}))
    backend = slm_model.backend
    context = getattr(backend, "context_length", None)
    long_prompt = min(2 * memory.PROMPT_EDGES[-1], (context or 0) - 64)  # room for the answer
    if context is not None and hasattr(backend, "encode") and long_prompt > memory.PROMPT_EDGES[-1]:
        text = lengths.prompt_of_tokens(long_prompt, lambda t: len(backend.encode(backend.render(t))))
        asked.append((text, {"max_new_tokens": 16}))
    for prompt, options in asked:
        if request_key(prompt, None, GenerationOptions(**options)) not in made:
            slm_model.generate(prompt, **options)


def _replay(
    slm_model: Any, loaded: Any, kind: Any, limit: float, text: str, *, steps: int, seconds: float
) -> memory.SoakVerdict:
    """A soak that sends one kind's requests again in turn, the first round untimed (buffers for this kind)."""

    def step(i: int) -> None:
        sent = kind.requests[i % len(kind.requests)]
        if kind.first_in_test:
            loaded.segment += 1  # as a new test would
        options = sent.options
        slm_model.generate(sent.chat, max_new_tokens=options.max_new_tokens, do_sample=options.do_sample,
                           temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                           seed=options.seed, min_new_tokens=options.min_new_tokens)  # fmt: skip

    # Warm-up: the kind's first two requests again, whose buffers may grow once on the way (a long prompt's
    # freed buffers were trimmed since the session made it).
    warmup = min(len(kind.requests), 2)
    result = memory.soak(step, steps=steps, warmup=warmup, time_budget_s=seconds, what=f"replay of {kind.label}",
                         min_steps=MIN_REPLAY, done=lambda so_far: so_far.settled_within(limit))  # fmt: skip
    return result.judged(limit, text)


@pytest.mark.slm_memory
@pytest.mark.parametrize("backend", ["ort-genai", "foundry"])
def test_no_leak_over_load_unload(
    backend: str, slm_deployment: Any, slm_settings: Any, slm_limits: dict[str, float], slm_verdict: Any,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """Loading and closing the model again and again does not grow RSS, in each runtime that serves it."""
    from pytest_slmdeploy.runtime import open_model

    # Foundry Local: skips with the reason where it is not in use; one model id, so a cycle's unload is the
    # session's copy's too, loaded again at the end.
    session_copy = request.getfixturevalue("slm_foundry_model") if backend == "foundry" else None

    def cycle(_: int) -> None:
        model = open_model(backend, slm_deployment.entry_dir, cache_root=slm_settings.cache_dir,
                           model_name=slm_deployment.name, threads=slm_settings.threads)  # fmt: skip
        model.generate(SMOKE_PROMPT, max_new_tokens=4)
        model.close()

    # Scaled to the model: leaking 1% of the loaded model per cycle must fail, whatever the model's size.
    model_mb = slm_deployment.manifest.model_bytes / 1e6
    share, slack = slm_limits["memory_max_load_share"], slm_limits["memory_load_slack_mb"]
    limit = share * model_mb + slack
    cycles = int(slm_limits["memory_load_cycles"])
    try:
        result = memory.soak(
            cycle, steps=2 * cycles, min_steps=cycles, warmup=RELOAD_WARMUP[backend], what=f"{backend} load/unload",
            per="cycle", time_budget_s=slm_limits["memory_seconds"],
            done=lambda so_far: so_far.settled_within(limit * 1e6),
        )  # fmt: skip
    finally:
        if session_copy is not None:
            session_copy.backend.load()
    slm_verdict(
        [result.judged(limit * 1e6, f"{limit:.2f} MB = {share:g} x the {model_mb:.1f} MB model + {slack:g} MB")]
    )
