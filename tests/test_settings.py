from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_slmdeploy.errors import SettingsError
from pytest_slmdeploy.settings import (
    check_model_name,
    default_cache_dir,
    default_model_name,
    resolve_settings,
    resolve_threads,
)


def _resolve(values: dict[str, object], env: dict[str, str] | None = None) -> object:
    return resolve_settings(values.get, ini_dir=Path("/proj"), env=env or {"XDG_CACHE_HOME": "/xdg"})


def test_defaults() -> None:
    settings = _resolve({})
    assert settings == resolve_settings({}.get, ini_dir=Path("/proj"), env={"XDG_CACHE_HOME": "/xdg"})
    assert not settings.enabled  # type: ignore[attr-defined]
    assert (settings.precision, settings.backend, settings.foundry) == ("int4", "ort-genai", "auto")  # type: ignore[attr-defined]
    assert (settings.suite, settings.rebuild, settings.trust_remote_code) == (True, False, False)  # type: ignore[attr-defined]
    assert settings.cache_dir == Path("/xdg/slmdeploy")  # type: ignore[attr-defined]


def test_relative_paths_are_taken_from_the_ini_dir() -> None:
    settings = resolve_settings({"slm_model": "models/m", "slm_cache": "/abs/c"}.get, ini_dir=Path("/proj"))
    assert settings.model == Path("/proj/models/m")
    assert settings.cache_dir == Path("/abs/c")
    assert settings.model_name == "m-int4"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("slm_precision", "int3", "slm_precision = 'int3' is not one of int4, int4-mixed, int8, fp32, fp16, auto"),
        ("slm_backend", "vllm", "slm_backend = 'vllm' is not one of ort-genai, foundry"),
        ("slm_lock_timeout", "-1", "slm_lock_timeout = -1 must be a finite number of seconds, 0 or more"),
        ("slm_rebuild", "perhaps", "slm_rebuild = 'perhaps' is not a boolean: use true or false"),
    ],
)
def test_bad_values(key: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        _resolve({key: value})
    assert str(info.value) == message


@pytest.mark.parametrize("text", ["true", "1", "yes", "on", "TRUE"])
def test_booleans(text: str) -> None:
    assert _resolve({"slm_rebuild": text}).rebuild is True  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["a/b", "../x", "..", "a\\b", "", ".hidden", "x" * 129, "a b"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(SettingsError, match="is not allowed"):
        check_model_name(name)


def test_default_names_and_cache() -> None:
    assert default_model_name(Path("/m/My Model (v2)"), "int8") == "my-model-v2-int8"
    assert check_model_name(default_model_name(Path("/m/.."), "int4"))
    assert default_cache_dir({"SLMDEPLOY_CACHE": "/c"}) == Path("/c")
    assert default_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/slmdeploy")


def test_spinning_setting() -> None:
    assert _resolve({}).spinning == "auto"  # type: ignore[attr-defined]
    assert _resolve({"slm_spinning": "OFF"}).spinning == "off"  # type: ignore[attr-defined]
    with pytest.raises(SettingsError, match="slm_spinning"):
        _resolve({"slm_spinning": "sometimes"})


def test_threads() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert _resolve({}).threads == cpus  # type: ignore[attr-defined]
    assert _resolve({"slm_threads": "auto"}, {"PYTEST_XDIST_WORKER_COUNT": "2"}).threads == max(1, cpus // 2)  # type: ignore[attr-defined]
    assert _resolve({"slm_threads": "64"}, {"PYTEST_XDIST_WORKER_COUNT": str(4 * cpus)}).threads == 64  # type: ignore[attr-defined]
    assert resolve_threads("auto", {"PYTEST_XDIST_WORKER_COUNT": str(4 * cpus)}) == 1
    assert resolve_threads("0") == 0  # ONNX Runtime GenAI's own default
    with pytest.raises(SettingsError, match=r"slm_threads = '-2' is not auto or a whole number"):
        _resolve({"slm_threads": "-2"})
