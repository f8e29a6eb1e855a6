"""Each checklist family catches what it is for, on real tiny models made to be defective."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_slmdeploy.tinymodel import FAQ

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _run(pytester: pytest.Pytester, model: Path, cache: Path, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "--slm-model", str(model), "--slm-cache", str(cache), "-p", "no:cacheprovider", "-rfs", *args
    )


def test_healthy_model_passes_everything_twice(pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path) -> None:
    for _ in range(2):  # no flaky failure across runs
        result = _run(pytester, tiny_model, warm_cache)
        result.assert_outcomes(passed=15 + len(FAQ), skipped=1)  # 512-token benchmark: over the context
        result.stdout.fnmatch_lines(
            [
                "pass *1. Answers queries from its fine-tuned domain*13/13*",
                "pass *2. Response format matches the expected structure*",
                "pass *3. No memory leaks during prolonged use*leak MB/1k generations*",
                "pass *4. Consistent performance across input lengths*TTFT ms by length*",
                "pass *5. Handles edge cases and invalid input*edge cases tried 40*",
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
    longest = int(lengths_line.rsplit(",", 1)[-1].split(":")[0].split()[-1])
    assert 30 < longest <= 48, lengths_line  # the sweep stops short of the 64-token context


LEAKING_TEST = """
import pytest
from pytest_slmdeploy.checklist import memory

class Leaky:
    '''Wraps the real model and keeps 1 MB per generation: a leak the memory family must catch.'''

    def __init__(self, model):
        self.model, self.hoard = model, []

    def generate(self, *args, **kwargs):
        self.hoard.append(bytearray(1_000_000))
        return self.model.generate(*args, **kwargs)

@pytest.mark.slm_memory(generations=60)
def test_soak_of_a_leaking_runtime(slm_model, slm_limits):
    leaky = Leaky(slm_model)
    steps = int(slm_limits["memory_generations"])
    result = memory.soak(lambda i: leaky.generate("Hello", max_new_tokens=8), steps=steps, warmup=5,
                         time_budget_s=30, what="leaky soak")
    assert result.mb_per_1k <= slm_limits["memory_max_mb_per_1k"], result.explain(slm_limits["memory_max_mb_per_1k"])
"""


def test_leaking_runtime_fails_memory(pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path) -> None:
    pytester.makepyfile(LEAKING_TEST)
    result = _run(pytester, tiny_model, warm_cache, "--slm-no-suite")
    result.stdout.fnmatch_lines(
        ["*leaky soak: RSS grows * MB per 1,000 generations (limit 8)*", "FAIL *3. No memory leaks*"]
    )
    result.assert_outcomes(failed=1)
    mb_per_1k = float(result.stdout.str().split("RSS grows ")[1].split(" MB")[0])
    assert 800 < mb_per_1k < 1200  # 1 MB per generation, measured as such
