"""Each checklist family catches what it is for, on real tiny models made to be defective."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_slmdeploy.checklist.format import GENERIC_PROMPTS, STOP_PROMPTS
from pytest_slmdeploy.testing.tinymodel import FAQ

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _run(pytester: pytest.Pytester, model: Path, cache: Path, *args: str) -> pytest.RunResult:
    # --rootdir: the test's folder, so its conftest.py (a defect injected into the suite) covers every item.
    return pytester.runpytest_subprocess(
        "--slm-model", str(model), "--slm-cache", str(cache), "--rootdir", str(pytester.path),
        "-p", "no:cacheprovider", "-rfs", *args,
    )  # fmt: skip


def test_healthy_model_passes_everything_twice(pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path) -> None:
    for _ in range(2):  # no flaky failure across runs
        result = _run(pytester, tiny_model, warm_cache)
        result.assert_outcomes(passed=15 + len(FAQ), skipped=1)  # 512-token benchmark: over the context
        result.stdout.fnmatch_lines(
            [
                f"pass *1. Answers queries from its fine-tuned domain*{len(FAQ)}/{len(FAQ)}*",
                "pass *2. Response format matches the expected structure*",
                "pass *3. No memory leaks during prolonged use*leak MB/1k generations*",
                "pass *4. Consistent performance across input lengths*TTFT ms by length*",
                "pass *5. Handles edge cases and invalid input*edge prompts tried 40*",
                "pass *6. Faithful to the fine-tuned source*answers identical *deployed prompt ids as source 64/64*",
                "not checked (skipped): Benchmark: *context*",  # the 512-token benchmark: said, not passed
            ]
        )


def test_model_that_never_stops_fails_format(pytester: pytest.Pytester, no_eos_model: Path, tmp_path: Path) -> None:
    result = _run(pytester, no_eos_model, tmp_path / "cache", "-m", "slm_format")
    result.stdout.fnmatch_lines(["*test_answers_stop_and_are_clean*", "FAIL *2. Response format*"])
    output = result.stdout.str()
    assert "did not stop by itself" in output or "runaway repetition" in output or "stopped by themselves" in output
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_model_that_leaks_template_tokens_fails_format(
    pytester: pytest.Pytester, leaky_template_model: Path, tmp_path: Path
) -> None:
    result = _run(pytester, leaky_template_model, tmp_path / "cache", "-m", "slm_format")
    result.stdout.fnmatch_lines(["*special/template tokens in the answer*", "FAIL *2. Response format*"])


def test_damaged_weights_fail_domain_answers(pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    damaged = Path(shutil.copytree(tiny_model, tmp_path / "damaged"))
    weights = load_file(str(damaged / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if name.endswith("mlp.down_proj.weight"):
            weights[name] = torch.randn(tensor.shape, generator=generator) * tensor.std() * 4
    save_file(weights, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    result = _run(pytester, damaged, tmp_path / "cache", "-m", "slm_domain")
    result.stdout.fnmatch_lines(["*missed:*", "*equals: *(text differs)*", "FAIL *1. Answers queries*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_short_context_model_shows_the_length_behaviour(
    pytester: pytest.Pytester, short_context_model: Path, tmp_path: Path
) -> None:
    result = _run(pytester, short_context_model, tmp_path / "cache", "-m", "slm_lengths")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["pass *4. Consistent performance across input lengths*TTFT ms by length*"])
    lengths_line = next(line for line in result.stdout.lines if "TTFT ms by length" in line)
    longest = max(int(tokens) for tokens in re.findall(r"(\d+):[\d.]+", lengths_line))
    assert 30 < longest <= 48, lengths_line  # the sweep stops short of the 64-token context


def test_model_silent_on_long_prompts_fails_lengths_only(
    pytester: pytest.Pytester, silent_on_long_model: Path, tmp_path: Path
) -> None:
    result = _run(pytester, silent_on_long_model, tmp_path / "cache")
    result.stdout.fnmatch_lines(["*empty answer at * prompt tokens (stop)*", "FAIL *4. Consistent performance*"])
    failed = [line for line in result.stdout.lines if line.startswith("FAILED")]
    assert len(failed) == 1, failed
    assert "test_every_length_works_and_scales" in failed[0], failed
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_template_that_crashes_on_blank_input_fails_edge_only(
    pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path
) -> None:
    broken = Path(shutil.copytree(tiny_model, tmp_path / "blank-crash"))
    template = broken / "chat_template.jinja"
    template.write_text(
        "{% for message in messages %}{% if message['content'] | trim == '' %}"
        "{{ raise_exception('empty message') }}{% endif %}{% endfor %}" + template.read_text()
    )
    result = _run(pytester, broken, tmp_path / "cache")
    result.stdout.fnmatch_lines(
        [
            "*unusual prompts were not handled*",
            "*prompt '': refused a prompt that fits the context: the model's chat template refused*empty message*",
            "FAIL *5. Handles edge cases*",
        ]
    )
    failed = [line for line in result.stdout.lines if line.startswith("FAILED")]
    assert len(failed) == 1, failed
    assert "test_unusual_prompts_get_answers" in failed[0], failed


# Defective runtimes, put under the built-in suite by overriding its fixtures (as a user's own wrapper would be).
LEAKING_RUNTIME = """
import pytest

class Leaky:  # wraps the real model and keeps 1 MB per generation
    def __init__(self, model):
        self.model, self.backend, self.hoard = model, model.backend, []

    def generate(self, *args, **kwargs):
        self.hoard.append(bytearray(1_000_000))
        return self.model.generate(*args, **kwargs)

@pytest.fixture(scope="session")
def slm_model(request):
    from pytest_slmdeploy.plugin import slm_session
    return Leaky(slm_session(request.config).model())
"""

LEAKING_PER_LOAD = """
import pytest
import pytest_slmdeploy.runtime as runtime

kept = []
real_open_model = runtime.open_model

def leaky_open_model(backend, *args, **kwargs):
    model = real_open_model(backend, *args, **kwargs)
    if backend == "ort-genai":
        kept.append(model.backend.model)  # the native model outlives close(): one loaded copy per cycle
    return model

@pytest.fixture(autouse=True)
def leak_per_load(monkeypatch):
    monkeypatch.setattr(runtime, "open_model", leaky_open_model)
"""

GREEDY_ONLY_RUNTIME = """
import pytest

class GreedyOnly:  # drops every sampling setting on the way to the runtime
    def __init__(self, model):
        self.model, self.backend = model, model.backend

    def generate(self, prompt, **kwargs):
        for key in ("do_sample", "temperature", "top_p", "top_k", "seed"):
            kwargs.pop(key, None)
        return self.model.generate(prompt, **kwargs)

@pytest.fixture(scope="session")
def slm_model(request):
    from pytest_slmdeploy.plugin import slm_session
    return GreedyOnly(slm_session(request.config).model())
"""


def test_leaking_runtime_fails_the_suites_memory_soak(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path
) -> None:
    """The memory family alone: it makes every kind of request itself, then replays each."""
    pytester.makeconftest(LEAKING_RUNTIME)
    result = _run(pytester, tiny_model, warm_cache, "-m", "slm_memory", "-o", "slm_memory_generations=60")
    result.stdout.fnmatch_lines(
        [
            "fail: replay of *: RSS grows * MB per generation (robust slope; limit * kB per generation*",
            "FAIL *3. No memory leaks*",
        ]
    )
    result.assert_outcomes(passed=2, failed=1)  # the load/unload checks do not go through slm_model
    mb_per_generation = float(result.stdout.str().split("RSS grows ")[1].split(" MB")[0])
    assert 0.8 < mb_per_generation < 1.2  # 1 MB per generation, measured as such


# Leaks near the limit (8 kB per generation) in one kind of request only: a wrapper of the loaded model, as a
# user's own would be. Each keeps 24 kB (3x the limit) per generation it is named for.
KIND_LEAK = """
import pytest

def roles(prompt, kwargs):
    messages = [{{"role": "user", "content": prompt}}] if isinstance(prompt, str) else list(prompt)
    return [m["role"] for m in messages] + (["system"] if kwargs.get("system") else [])

class LeakIn:
    def __init__(self, model):
        self.model, self.backend, self.hoard, self.segment = model, model.backend, [], None

    def generate(self, prompt, **kwargs):
        answer = self.model.generate(prompt, **kwargs)
        first, self.segment = self.model.segment != self.segment, self.model.segment
        if {condition}:
            self.hoard.append(bytearray({size}))
        return answer

@pytest.fixture(scope="session")
def slm_model(request):
    from pytest_slmdeploy.plugin import slm_session
    return LeakIn(slm_session(request.config).model())
"""

KIND_LEAKS = {
    "system prompt": ('"system" in roles(prompt, kwargs)', "24_000"),
    "multi-turn": ('roles(prompt, kwargs).count("user") > 1', "24_000"),
    "a test's first generation": ("first", "24_000"),
    # 300 B per token of every generation: 3x slm_memory_max_bytes_per_token
    "per token": ("True", "300 * (answer.prompt_tokens + answer.new_tokens)"),
}


@pytest.mark.parametrize("kind", KIND_LEAKS)
def test_a_leak_in_one_kind_of_request_fails_only_memory(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path, kind: str
) -> None:
    """Issue 21, items 1 and 9: the whole suite, with a leak of 3x the limit in one kind of request only. Before
    the replay of the session's own kinds of request, a flat soak of short last-user prompts decided and the
    run passed (such requests are a few of the session's)."""
    condition, size = KIND_LEAKS[kind]
    pytester.makeconftest(KIND_LEAK.format(condition=condition, size=size))
    result = _run(pytester, tiny_model, warm_cache)
    decided = re.search(r"fail: replay of ([^:]*): RSS grows", result.stdout.str())
    assert decided is not None, result.stdout.str()[-3000:]
    if kind != "per token":
        assert kind in decided.group(1)
    failed = {line.split()[1] for line in result.stdout.lines if line.startswith("FAILED")}
    assert failed == {"slmdeploy::test_no_leak_over_many_generations"}, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["FAIL *3. No memory leaks*decided by replay of *"])


def test_runtime_leaking_per_load_fails_load_unload(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path
) -> None:
    pytester.makeconftest(LEAKING_PER_LOAD)
    result = _run(pytester, tiny_model, warm_cache, "-m", "slm_memory")
    result.stdout.fnmatch_lines(
        ["fail: ort-genai load/unload: RSS grows * MB per cycle (robust slope; limit *", "FAIL *3. No memory*"]
    )
    failed = {line.split()[1] for line in result.stdout.lines if line.startswith("FAILED")}
    assert failed == {"slmdeploy::test_no_leak_over_load_unload[ort-genai]"}, result.stdout.str()[-3000:]


def test_runtime_ignoring_sampling_fails_edge(pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path) -> None:
    pytester.makeconftest(GREEDY_ONLY_RUNTIME)
    result = _run(pytester, tiny_model, warm_cache, "-m", "slm_edge")
    result.stdout.fnmatch_lines(["*sampling settings do not reach the runtime*", "FAIL *5. Handles edge cases*"])
    result.assert_outcomes(passed=1, failed=1)


# The build writes a PromptTemplate without its system part (the chat template has one).
DROPPED_TEMPLATE_PART = """
import pytest_slmdeploy.deploy as deploy

written = deploy.inference_model_json

def without_system(*args, **kwargs):
    info = written(*args, **kwargs)
    info["PromptTemplate"].pop("system")
    return info

deploy.inference_model_json = without_system
"""


def test_prompt_template_missing_a_part_fails_only_the_template_check(
    pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path
) -> None:
    """Issue 21, item 9: the check compared only the conversations the installed PromptTemplate can express, so
    one that lost its system part passed (system conversations were skipped). The whole suite runs."""
    pytester.makeconftest(DROPPED_TEMPLATE_PART)
    result = _run(pytester, tiny_model, tmp_path / "cache")
    result.stdout.fnmatch_lines(["*PromptTemplate has no 'system' part, which the chat template's has*"])
    failed = {line.split()[1] for line in result.stdout.lines if line.startswith("FAILED")}
    assert failed == {"slmdeploy::test_prompt_template_matches_the_model"}, result.stdout.str()[-3000:]


# A runtime that drops one sampling setting on the way (the seed: a fixed one), the others reaching it.
DROPS_ONE_SETTING = """
import pytest

class Drops:
    def __init__(self, model):
        self.model, self.backend = model, model.backend

    def generate(self, prompt, **kwargs):
        if kwargs.get("do_sample"):
            {drop}
        return self.model.generate(prompt, **kwargs)

@pytest.fixture(scope="session")
def slm_model(request):
    from pytest_slmdeploy.plugin import slm_session
    return Drops(slm_session(request.config).model())
"""
DROPS = {
    "seed": 'kwargs["seed"] = 42',
    "top_k": 'kwargs.pop("top_k", None)',
    "top_p": 'kwargs.pop("top_p", None)',
}


@pytest.mark.parametrize("setting", DROPS)
def test_runtime_dropping_one_sampling_setting_fails_only_edge(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path, setting: str
) -> None:
    """Issue 21, item 9: the sampling check passed a runtime that ignores the seed, top_p or top_k. The whole suite
    runs; only the sampling check fails, naming the setting."""
    pytester.makeconftest(DROPS_ONE_SETTING.format(drop=DROPS[setting]))
    result = _run(pytester, tiny_model, warm_cache)
    result.stdout.fnmatch_lines([f"*{setting} does not reach the runtime*", "FAIL *5. Handles edge cases*"])
    failed = {line.split()[1] for line in result.stdout.lines if line.startswith("FAILED")}
    assert failed == {"slmdeploy::test_sampling_settings_reach_the_runtime"}, result.stdout.str()[-3000:]


# A runtime whose prefill or decode slows with the prompt beyond what the lengths family allows: it really waits,
# and reports the time it took. Past the limit at 495 prompt tokens on the tiny model, within it at 128. The TTFT
# allowed at 495 tokens follows the machine's own TTFT at 13 (76 x it, + 20 ms): about 60 ms on one machine here,
# 124 ms on a slower one, where a prefill adding 120 ms at 495 tokens was only 2% over and undecided (14 of 20
# rounds over); 245 ms is twice the slower machine's limit.
SLOW_WITH_LENGTH = """
import dataclasses, time
import pytest

class SlowWithLength:
    def __init__(self, model):
        self.model, self.backend = model, model.backend

    def generate(self, prompt, **kwargs):
        answer = self.model.generate(prompt, **kwargs)
        n = answer.prompt_tokens
        first, step = {first}, {step}
        time.sleep(first + step * len(answer.step_s))
        return dataclasses.replace(
            answer, ttft_s=answer.ttft_s + first, total_s=answer.total_s + first + step * len(answer.step_s),
            step_s=tuple(s + step for s in answer.step_s),
        )

@pytest.fixture(scope="session")
def slm_model(request):
    from pytest_slmdeploy.plugin import slm_session
    return SlowWithLength(slm_session(request.config).model())
"""
SLOWDOWNS = {
    "prefill grows with the square of the prompt": ("1e-6 * n * n", "0", "TTFT at *"),
    "decode slows with the prompt": ("0", "2.4e-6 * n", "time per decoded token at *"),
}


@pytest.mark.parametrize("slowdown", SLOWDOWNS)
def test_runtime_slowing_with_length_fails_only_lengths(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path, slowdown: str
) -> None:
    """Issue 21, item 8: the lengths timing rules were never shown to fail a timing defect. The whole suite runs
    beside a runtime that slows about 2x past the limit at the longest prompt; only the lengths check fails."""
    first, step, said = SLOWDOWNS[slowdown]
    pytester.makeconftest(SLOW_WITH_LENGTH.format(first=first, step=step))
    result = _run(pytester, tiny_model, warm_cache)
    result.stdout.fnmatch_lines([f"*fail: {said}", "FAIL *4. Consistent performance across input lengths*"])
    failed = {line.split()[1] for line in result.stdout.lines if line.startswith("FAILED")}
    assert failed == {"slmdeploy::test_every_length_works_and_scales"}, result.stdout.str()[-3000:]


CUT_CASES = {"cut-off": (16, "{not-contains: '<|im_end|>'}"), "few-cut": (4, "{not-contains: '<|im_end|>'}"),
             "declared": (16, "{finish-reason: length}")}  # fmt: skip


@pytest.mark.parametrize("cut", CUT_CASES)
def test_answers_cut_at_a_case_limit_count_in_the_stop_rate(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path, cut: str
) -> None:
    """An answer that hits its case's own limit did not stop (issue 21, item 2: such answers were left out of
    the stop rate); only a case that declares the limit as expected (finish-reason: length) is not counted.
    The share is decided on its 95% interval (issue 21, item 5): 16 misses among 76 answers fail the 90% limit,
    4 among 76 are too few to tell from it (inconclusive, not pass)."""
    count, expect = CUT_CASES[cut]
    cases = "".join(
        f"  - id: cut-{i}\n    prompt: {FAQ[i % len(FAQ)][0]!r}\n    max_tokens: 3\n    expect: {expect}\n"
        for i in range(count)
    )
    pytester.makefile(".yaml", slm_cases_cut=f"cases:\n{cases}")
    result = _run(pytester, tiny_model, warm_cache, "-m", "slm_format or slm_domain")
    # The format check takes the run's first 16 domain cases (the cut ones come first), then the built-in prompts.
    domain = min(16, count + len(FAQ))
    built_in = len(GENERIC_PROMPTS) + len(STOP_PROMPTS)
    if cut == "declared":  # the declared cases are no evidence either way
        total = domain - count + built_in
        result.stdout.fnmatch_lines([f"pass *2. Response format*stop rate {total}/{total} (95% interval *"])
        assert result.ret == pytest.ExitCode.OK
        return
    total = domain + built_in
    row = f"*2. Response format*stop rate {total - count}/{total} (95% interval *"
    if cut == "cut-off":
        result.stdout.fnmatch_lines([f"*stop rate {total - count}/{total} * below the limit 90%*", f"FAIL {row}"])
        assert result.ret == pytest.ExitCode.TESTS_FAILED
    else:
        result.stdout.fnmatch_lines([f"pass {row}", "inconclusive*too few answers to tell it from the limit 90%*"])
        assert "(1 inconclusive)" in result.stdout.str()
        assert result.ret == pytest.ExitCode.OK


def test_a_context_longer_than_the_sweep_is_still_checked(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path
) -> None:
    """Issue 21, item 7: the context test skipped whenever the context exceeded slm_lengths_max_tokens, i.e. on
    every real SLM, and the row still said pass. Now the deployed context is held to the source's config and a
    prompt over it must be refused (no prefill needed); only the full-context generation is left out, and said."""
    result = _run(pytester, tiny_model, warm_cache, "-m", "slm_lengths", "-o", "slm_lengths_max_tokens=32")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["pass *4. Consistent performance*context boundary 512 tokens as the source; over it refused; a full "
         "context not tried (over slm_lengths_max_tokens = 32)*"]
    )  # fmt: skip


# The build is made from another folder than the source it is judged against: a recipe hook, as a user's own
# would be, points Olive at it. Everything but the weights is the source's (tokenizer, template, cases).
BUILT_FROM = """
import copy

def pytest_slmdeploy_recipe(recipe, settings, config):
    recipe = copy.deepcopy(recipe)
    recipe["input_model"]["model_path"] = {path!r}
    return recipe
"""


def test_another_checkpoint_fails_only_fidelity(
    pytester: pytest.Pytester, tiny_model: Path, other_checkpoint: Path, tmp_path: Path
) -> None:
    """Issue 21, items 4 and 9: an unrelated model, in a whole-suite run. The FAQ model trained again from another
    seed answers every domain case the same and stops, loops and leaks alike; only its answers to the general
    prompts differ, and fidelity is the one check that compares the installed model with its source."""
    pytester.makeconftest(BUILT_FROM.format(path=str(other_checkpoint)))
    result = _run(pytester, tiny_model, tmp_path / "cache")
    result.stdout.fnmatch_lines(["FAIL *6. Faithful to the fine-tuned source*"])
    failed = {line.split()[1] for line in result.stdout.lines if line.startswith("FAILED")}
    assert failed == {"slmdeploy::test_faithful_to_the_source"}, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["*top-1 agreement *% (95% interval *%-*%) < 95.0%*"])


# Noise on every weight matrix, as a share of its RMS, against top-1 agreement over the 64 prompts (one sweep):
# 0.05: 98.6%; 0.2: 96.4% (pass); 0.35: 93.5% (91.0-95.3%, inconclusive); 0.42: 92.4% (89.6-94.5%, fail);
# 0.5: 89.5%; 0.7: 84.5%, and the domain cases fail too.
NEAR_LIMIT_NOISE = 0.42


def test_a_build_3_points_under_the_limit_fails_only_fidelity(
    pytester: pytest.Pytester, tiny_model: Path, perturbed: Callable[[float], Path], tmp_path: Path
) -> None:
    """Issue 21, item 9: a deployed model about 3 points under the top-1 limit (the FAQ model with small noise on
    every weight matrix), in a whole-suite run: fidelity fails on the 64-prompt evidence, nothing else does."""
    pytester.makeconftest(BUILT_FROM.format(path=str(perturbed(NEAR_LIMIT_NOISE))))
    result = _run(pytester, tiny_model, tmp_path / "cache")
    result.stdout.fnmatch_lines(["*top-1 agreement 9[1-3].*% (95% interval *%-9[2-4].*%) < 95.0%*"])
    failed = {line.split()[1] for line in result.stdout.lines if line.startswith("FAILED")}
    assert failed == {"slmdeploy::test_faithful_to_the_source"}, result.stdout.str()[-3000:]


# Every logit divided by this: the same greedy answers, flatter distributions. One sweep of the example model's int4
# build, mean KLD (95% interval) against the limit 0.1, top-1 agreement 99.7% throughout: 1.25: 0.035 (pass);
# 1.4: 0.102 (0.097-0.107, inconclusive); 1.5: 0.172 (0.164-0.179, fail); 2: 0.79 (fail).
FLAT_TEMPERATURE = 1.5


def test_a_flattened_distribution_fails_only_fidelity(
    pytester: pytest.Pytester, tiny_model: Path, flattened: Callable[[float], Path], tmp_path: Path
) -> None:
    """Issue 21, items 4 and 9: a flat distribution that ranks tokens as the source does, in a whole-suite run. Every
    greedy answer is the source's, so the domain cases, the stop rate and top-1 agreement cannot see it; the mean
    KLD over the full vocabulary (a near-tie can forgive a token's rank, never a distribution) fails it, and
    nothing else fails."""
    pytester.makeconftest(BUILT_FROM.format(path=str(flattened(FLAT_TEMPERATURE))))
    result = _run(pytester, tiny_model, tmp_path / "cache")
    failed = {line.split()[1] for line in result.stdout.lines if line.startswith("FAILED")}
    assert failed == {"slmdeploy::test_faithful_to_the_source"}, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["*mean KLD * (95% interval *-*) > 0.1*"])
    assert "< 95.0%" not in result.stdout.str()  # top-1 agreement passes: the ranking is the source's
