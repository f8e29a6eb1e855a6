"""The built-in suite, collected when ``--slm-model`` is set (turn off with ``--slm-no-suite``)."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_slmdeploy.foundry import is_foundry_entry

SMOKE_PROMPT = "Hello"


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
