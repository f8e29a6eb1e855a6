"""pytest hooks and fixtures: they only wire pytest to :class:`SlmDeploySession`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_slmdeploy import hookspecs
from pytest_slmdeploy.report import FIGURE_PREFIX
from pytest_slmdeploy.session import SUITE_PATH, SlmDeploySession
from pytest_slmdeploy.settings import BACKENDS, FOUNDRY_MODES, PRECISIONS

_session_key = pytest.StashKey[SlmDeploySession]()

# (flag, ini key, ini type, help, extra argparse keywords)
_OPTIONS: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("--slm-model", "slm_model", "string",
     "Hugging Face model folder to build, install and check (enables the plugin).", {"metavar": "PATH"}),
    ("--slm-precision", "slm_precision", "string",
     "quantization: int4 (default, as in the tutorial), int8, fp32; fp16 needs a provider that supports it.",
     {"choices": PRECISIONS}),
    ("--slm-cache", "slm_cache", "string",
     "model cache folder (Foundry Local layout: custom/<name>/); default $SLMDEPLOY_CACHE or ~/.cache/slmdeploy.",
     {"metavar": "DIR"}),
    ("--slm-name", "slm_name", "string",
     "model name in the cache and in inference_model.json; default <folder>-<precision>.", {"metavar": "NAME"}),
    ("--slm-rebuild", "slm_rebuild", "bool",
     "build again even if an identical build is installed.", {"action": "store_const", "const": True}),
    ("--slm-backend", "slm_backend", "string",
     "runtime for the tests: ort-genai (default, in-process) or foundry (Foundry Local SDK).", {"choices": BACKENDS}),
    ("--slm-foundry", "slm_foundry", "string",
     "register the installed model with the Foundry Local SDK: auto (if installed, default), yes, no.",
     {"choices": FOUNDRY_MODES}),
    ("--slm-chat-template", "slm_chat_template", "string",
     "prompt format: auto (the model's own chat template, default), chatml, or a .jinja file.",
     {"metavar": "auto|chatml|PATH"}),
    ("--slm-trust-remote-code", "slm_trust_remote_code", "bool",
     "allow a model that needs its own Python code (config.json auto_map).",
     {"action": "store_const", "const": True}),
    ("--slm-lock-timeout", "slm_lock_timeout", "string",
     "seconds to wait for another process building the same model (default 1800).", {"metavar": "SECONDS"}),
    ("--slm-report", "slm_report", "string",
     "write the checklist results (families, pass/fail, key figures) as JSON to FILE.", {"metavar": "FILE"}),
    ("--slm-suite", "slm_suite", "bool",
     "run the built-in checklist suite (default); --slm-no-suite turns it off.",
     {"action": "store_const", "const": True}),
]  # fmt: skip


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("slmdeploy", "small language model deployment (pytest-slmdeploy)")
    for flag, key, ini_type, help_text, extra in _OPTIONS:
        group.addoption(flag, dest=key, default=None, help=help_text, **extra)
        parser.addini(key, help=help_text.split(";")[0], type=ini_type, default=None)  # type: ignore[arg-type]
    group.addoption(
        "--slm-no-suite", dest="slm_suite", action="store_const", const=False, help="do not run the built-in suite."
    )


def _value(config: pytest.Config, key: str) -> object | None:
    """Command line first, then ini; command-line paths are made absolute against the invocation dir."""
    value: object | None = config.getoption(key)
    if value is not None:
        is_path = key in ("slm_model", "slm_cache", "slm_report")
        if is_path or (key == "slm_chat_template" and value not in ("auto", "chatml")):
            return str(config.invocation_params.dir / Path(str(value)).expanduser())
        return value
    ini = config.getini(key)  # None when unset (default=None), so "not set" differs from "false"
    return None if ini in ("", None) else ini


def pytest_configure(config: pytest.Config) -> None:
    from pytest_slmdeploy.errors import SlmDeployError
    from pytest_slmdeploy.settings import resolve_settings

    for line in SlmDeploySession.MARKERS:
        config.addinivalue_line("markers", line)
    ini_dir = config.inipath.parent if config.inipath else config.rootpath
    try:
        settings = resolve_settings(lambda key: _value(config, key), ini_dir=ini_dir)
        session = SlmDeploySession(config, settings)
        session.check_source()
    except SlmDeployError as exc:
        raise pytest.UsageError(f"slmdeploy: {exc}") from None
    config.stash[_session_key] = session
    config.pluginmanager.register(session, "slmdeploy-session")


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection sees the items
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    slm = config.stash.get(_session_key, None)
    if slm is None or not (slm.settings.enabled and slm.settings.suite):
        return
    # The suite lives in site-packages; a fixed node id keeps it readable ("slmdeploy::test_...").
    module = pytest.Module.from_parent(session, path=SUITE_PATH, nodeid="slmdeploy")
    items.extend(session.genitems(module))


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(_session_key, None)
    if session is not None:
        session.close()
        config.pluginmanager.unregister(session)
        del config.stash[_session_key]


def _session(request: pytest.FixtureRequest) -> SlmDeploySession:
    return request.config.stash[_session_key]


@pytest.fixture
def slm_figure(request: pytest.FixtureRequest) -> Any:
    """``slm_figure(name, value)`` adds a key figure to this test's checklist row (and to JUnit)."""

    def record(name: str, value: object) -> None:
        request.node.user_properties.append((f"{FIGURE_PREFIX}{name}", value))

    return record


@pytest.fixture(scope="session")
def slm_settings(request: pytest.FixtureRequest) -> Any:
    """The resolved :class:`~pytest_slmdeploy.settings.Settings`."""
    return _session(request).settings


@pytest.fixture(scope="session")
def slm_deployment(request: pytest.FixtureRequest) -> Any:
    """The built and installed model (:class:`~pytest_slmdeploy.deploy.Deployment`); built once per session."""
    return _session(request).deployment()


@pytest.fixture(scope="session")
def slm_cache(request: pytest.FixtureRequest) -> Any:
    """The model cache (:class:`~pytest_slmdeploy.cache.ModelCache`)."""
    return _session(request).cache


@pytest.fixture(scope="session")
def slm_model(request: pytest.FixtureRequest) -> Any:
    """The installed model, loaded once (:class:`~pytest_slmdeploy.runtime.SlmModel`): ``generate``, ``chat``."""
    return _session(request).model()


@pytest.fixture(scope="session")
def slm_foundry_model(request: pytest.FixtureRequest) -> Any:
    """The installed model registered with Foundry Local and loaded through its SDK (an ``SlmModel``)."""
    return _session(request).foundry_model()
