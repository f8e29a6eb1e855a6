"""pytest hooks and fixtures: they only wire pytest to :class:`SlmDeploySession`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_slmdeploy import hookspecs
from pytest_slmdeploy.items import DEFAULT_CASE_PATTERNS, CaseFile, CaseItem, is_case_file, model_case_files
from pytest_slmdeploy.report import FIGURE_PREFIX, INCONCLUSIVE_PROPERTY
from pytest_slmdeploy.session import SUITE_PATH, SlmDeploySession
from pytest_slmdeploy.settings import BACKENDS, FOUNDRY_MODES, LIMITS, PRECISIONS

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
    ("--slm-bench-save", "slm_bench_save", "bool",
     "append this run's LLM benchmark metrics to the history.", {"action": "store_const", "const": True}),
    ("--slm-bench-name", "slm_bench_name", "string",
     "name of this run in the benchmark history (default: its time).", {"metavar": "NAME"}),
    ("--slm-bench-history", "slm_bench_history", "string",
     "benchmark history folder (default .slmdeploy/history next to the ini file).", {"metavar": "DIR"}),
    ("--slm-bench-baseline", "slm_bench_baseline", "string",
     "gate this run against a baseline: last, a run NAME, or a JSON FILE of one record.",
     {"metavar": "last|NAME|FILE"}),
    ("--slm-bench-gate", "slm_bench_gate", "string",
     "a regression gate METRIC:N% (repeatable), e.g. decode_tps:-5% or peak_rss_mb:+10%; "
     "default with a baseline: decode_tps:-15% ttft_ms:+25% peak_rss_mb:+25%.",
     {"metavar": "GATE", "action": "append"}),
    ("--slm-bench-export", "slm_bench_export", "string",
     "write the metrics for github-action-benchmark (customBiggerIsBetter/SmallerIsBetter) to FILE.",
     {"metavar": "FILE"}),
    ("--slm-fail-inconclusive", "slm_fail_inconclusive", "bool",
     "fail timing checks that the run's noise leaves undecided (default: report them as inconclusive); "
     "for quiet, dedicated runners.", {"action": "store_const", "const": True}),
    ("--slm-suite", "slm_suite", "bool",
     "run the built-in checklist suite (default); --slm-no-suite turns it off.",
     {"action": "store_const", "const": True}),
]  # fmt: skip


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("slmdeploy", "small language model deployment (pytest-slmdeploy)")
    for flag, key, ini_type, help_text, extra in _OPTIONS:
        group.addoption(flag, dest=key, default=None, help=help_text.replace("%", "%%"), **extra)  # argparse formats %
        parser.addini(key, help=help_text.split(";")[0], type=ini_type, default=None)  # type: ignore[arg-type]
    group.addoption(
        "--slm-no-suite", dest="slm_suite", action="store_const", const=False, help="do not run the built-in suite."
    )
    parser.addini(
        "slm_case_files",
        help="glob patterns of domain case files to collect (default: slm_cases*.yaml/yml/toml)",
        type="args",
        default=list(DEFAULT_CASE_PATTERNS),
    )
    for key, (default, help_text) in LIMITS.items():
        parser.addini(f"slm_{key}", help=f"checklist: {help_text} (default {default:g})", default=None)


def _value(config: pytest.Config, key: str) -> object | None:
    """Command line first, then ini; command-line paths are made absolute against the invocation dir."""
    value: object | None = config.getoption(key, None)
    if value is not None:
        is_path = key in ("slm_model", "slm_cache", "slm_report", "slm_bench_history", "slm_bench_export")
        if is_path and not str(value).strip():
            return ""  # refused by the settings, never taken as the current folder
        if is_path or (key == "slm_chat_template" and value not in ("auto", "chatml")):
            return str(config.invocation_params.dir / Path(str(value)).expanduser())
        return value
    try:
        ini = config.getini(key)  # None when unset (default=None), so "not set" differs from "false"
    except (ValueError, pytest.UsageError) as exc:  # pytest's own bool parsing: its message does not name the key
        from pytest_slmdeploy.errors import SettingsError

        raise SettingsError(f"{key}: {exc}: use true or false") from None
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
    # The suite lives in site-packages; fixed node ids keep it readable ("slmdeploy::test_...").
    module = pytest.Module.from_parent(session, path=SUITE_PATH, nodeid="slmdeploy")
    items.extend(session.genitems(module))
    for path in model_case_files(slm.plan.source.path):
        items.extend(session.genitems(CaseFile.from_parent(session, path=path, nodeid=f"slmdeploy-model/{path.name}")))
    if any(isinstance(item, CaseItem) for item in items):  # the cases are the domain family; no placeholder
        items[:] = [item for item in items if item.name != "test_domain_cases_exist"]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> CaseFile | None:
    if not is_case_file(file_path, parent.config.getini("slm_case_files")):
        return None
    slm = parent.config.stash.get(_session_key, None)
    if (
        slm is not None
        and slm.settings.model is not None
        and file_path.resolve().parent == slm.settings.model.resolve()
    ):
        return None  # the model's own cases run with the built-in suite
    return CaseFile.from_parent(parent, path=file_path)


def slm_session(config: pytest.Config) -> SlmDeploySession:
    """The run's :class:`SlmDeploySession` (for plugins and the plugin's own test items)."""
    return config.stash[_session_key]


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(_session_key, None)
    if session is not None:
        session.close()
        config.pluginmanager.unregister(session)
        del config.stash[_session_key]


def _session(request: pytest.FixtureRequest) -> SlmDeploySession:
    return slm_session(request.config)


@pytest.fixture
def slm_figure(request: pytest.FixtureRequest) -> Any:
    """``slm_figure(name, value)`` adds a key figure to this test's checklist row (and to JUnit)."""

    def record(name: str, value: object) -> None:
        request.node.user_properties.append((f"{FIGURE_PREFIX}{name}", value))

    return record


@pytest.fixture
def slm_verdict(request: pytest.FixtureRequest) -> Any:
    """``slm_verdict(comparisons)`` judges :func:`pytest_slmdeploy.stats.compare` results: fails on a decided
    failure; reports one that this run's noise left undecided as inconclusive (a failure with
    ``--slm-fail-inconclusive``)."""
    from pytest_slmdeploy.stats import Verdicts

    def judge(comparisons: Any) -> None:
        verdicts = Verdicts.of(list(comparisons))
        request.node.user_properties.extend((INCONCLUSIVE_PROPERTY, m) for m in verdicts.inconclusive)
        if verdicts.failed:
            pytest.fail("\n".join(verdicts.failed), pytrace=False)
        if verdicts.inconclusive and _session(request).settings.fail_inconclusive:
            undecided = "\n".join(verdicts.inconclusive)
            pytest.fail(
                f"timing left undecided by this run's noise (--slm-fail-inconclusive):\n{undecided}", pytrace=False
            )

    return judge


@pytest.fixture
def slm_limits(request: pytest.FixtureRequest) -> dict[str, float]:
    """Checklist limits for this test: ini values, overridden by its ``slm_<family>(key=value)`` marker keywords."""
    limits = dict(_session(request).settings.limits)
    for marker in reversed(list(request.node.iter_markers())):
        if marker.name.startswith("slm_"):
            family = marker.name.removeprefix("slm_")
            for key, value in marker.kwargs.items():
                name = key if key in limits else f"{family}_{key}"
                if name not in limits:
                    raise pytest.UsageError(f"@pytest.mark.{marker.name}({key}=...): unknown limit; see slm_* ini keys")
                limits[name] = float(value)
    return limits


@pytest.fixture
def slm_benchmark(request: pytest.FixtureRequest, slm_model: Any, slm_limits: dict[str, float]) -> Any:
    """``slm_benchmark(prompt, new_tokens=32)`` times generations with pytest-benchmark and returns
    :class:`~pytest_slmdeploy.bench.GenerationStats` (TTFT, prefill/decode tok/s, spread, peak RSS, CPU)."""
    from pytest_slmdeploy.bench import LlmBenchmark

    benchmark = request.getfixturevalue("benchmark")
    return LlmBenchmark(benchmark, slm_model, lambda k, v: request.node.user_properties.append((k, v)), slm_limits)


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
