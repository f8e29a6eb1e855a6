"""pytest hooks and fixtures: they only wire pytest to :class:`SlmDeploySession`.

pytest imports this module in every run of the environment, with or without ``--slm-model``: it imports
only the settings and the case-file node classes; the session (build, cache, benchmarks) loads when a
run has a model.
"""

from __future__ import annotations

import glob
from collections.abc import Generator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_slmdeploy import hookspecs
from pytest_slmdeploy.items import DEFAULT_CASE_PATTERNS, CaseFile, CaseItem, is_case_file, model_case_files
from pytest_slmdeploy.settings import (
    AUTO_PRECISION,
    BACKENDS,
    FOUNDRY_MODES,
    LIMITS,
    NO_MODEL,
    PRECISIONS,
    SPINNING_MODES,
)
from pytest_slmdeploy.stash import RUN_KEY as _run_key
from pytest_slmdeploy.stash import SESSION_KEY as _session_key
from pytest_slmdeploy.stash import SETTINGS_KEY as _settings_key
from pytest_slmdeploy.stash import slm_session

__all__ = ["NO_MODEL", "slm_session"]  # where plugins and tests have imported them from

if TYPE_CHECKING:
    from pytest_slmdeploy.session import SlmDeploySession

MARKERS = (
    "slm_domain: domain-answer checks of the deployed model (checklist item 1)",
    "slm_format: response-format checks (checklist item 2)",
    "slm_memory: memory-leak checks in prolonged use (checklist item 3)",
    "slm_lengths: behaviour across input lengths (checklist item 4)",
    "slm_edge: edge cases and invalid input (checklist item 5)",
    "slm_fidelity: faithful to the fine-tuned source model (checklist item 6)",
    "slm_benchmark: performance measurements of the deployed model",
    "slm_smoke: the installed model loads and answers (deployment)",
)
# The built-in suite's node ids: "slmdeploy::test_...", and "slmdeploy-model/<file>::<case id>" for the
# model folder's own case files. Given as arguments, they select those items (see Selection).
SUITE_NODEID = "slmdeploy"
MODEL_CASES_NODEID = "slmdeploy-model"

_selection_key = pytest.StashKey["Selection"]()

# (flag, ini key, ini type, help, extra argparse keywords)
_OPTIONS: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("--slm-model", "slm_model", "string",
     "Hugging Face model folder to build, install and check (enables the plugin); repeat it to check several "
     "models in one run (or list them in the slm_models ini table).", {"metavar": "PATH", "action": "append"}),
    ("--slm-precision", "slm_precision", "string",
     "quantization recipe: int4 (default: GPTQ 4-bit, attention 8-bit), int4-mixed (about 6 bits a weight), "
     "int8 (8-bit weights), fp32, or auto: the smallest of these that stays faithful to the source and passes "
     "the domain cases (the precision ladder); fp16 needs a provider that supports it.",
     {"choices": (*PRECISIONS, AUTO_PRECISION)}),
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
    ("--slm-threads", "slm_threads", "string",
     "ONNX Runtime GenAI threads per model: auto (the CPUs this process may use, shared among xdist workers; "
     "default), N, or 0 for ONNX Runtime GenAI's own default (half the hardware threads).", {"metavar": "auto|N"}),
    ("--slm-spinning", "slm_spinning", "string",
     "ONNX Runtime's intra-op spinning: auto (default: off when other processes keep the CPUs busy as the run "
     "starts, where spinning threads wait on each other), on, off.", {"choices": SPINNING_MODES}),
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
     "default with a baseline: decode_tps:-15% decode_cpu_us:+15% ttft_ms:+25% peak_rss_mb:+25%.",
     {"metavar": "GATE", "action": "append"}),
    ("--slm-bench-export", "slm_bench_export", "string",
     "write the metrics for github-action-benchmark (customBiggerIsBetter/SmallerIsBetter) to FILE.",
     {"metavar": "FILE"}),
    ("--slm-fail-inconclusive", "slm_fail_inconclusive", "bool",
     "fail timing and memory checks that the run's evidence leaves undecided (default: report them as inconclusive); "
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
    group.addoption(
        "--slm-only",
        dest="slm_only",
        action="append",
        metavar="NAME",
        help="check only this model of the slm_models table (repeatable): a CI matrix job checks one.",
    )
    parser.addini(
        "slm_models",
        help="several models in one run: a list of tables {name, path, precision, chat_template, cases, limits} "
        "(in pytest.ini/tox.ini: one line of key=value words per model)",
        type="linelist",
        default=[],
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
    value: object | None = config.getoption(key, None) if key != "slm_model" else None  # see _cli_models
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


def _cli_models(config: pytest.Config) -> list[str] | None:
    """Each ``--slm-model`` of the command line, made absolute against the invocation dir ("" kept: the settings
    refuse it); ``NAME=PATH`` stays named. Several only when the command line itself repeats the option: one
    given in ``addopts`` or ``PYTEST_ADDOPTS`` is replaced by the command line's, as before."""
    given = config.getoption("slm_model", None)
    if not given:
        return None
    typed = sum(1 for arg in config.invocation_params.args if str(arg).split("=")[0] == "--slm-model")
    values = [str(value) for value in given][-max(1, typed) :]
    here = config.invocation_params.dir
    return [_cli_model(value, here) for value in values]


def _cli_model(value: str, here: Path) -> str:
    if not value.strip():
        return ""
    name, sep, path = value.partition("=")
    if sep and name and "/" not in name and not (here / value).exists():  # NAME=PATH
        return f"{name}={here / Path(path).expanduser()}"
    return str(here / Path(value).expanduser())


def _names_suite(arg: str, invocation_dir: Path) -> bool:
    """Whether a command-line argument is a node id of the built-in suite (and not a real path)."""
    path = arg.partition("::")[0].partition("[")[0]
    ours = path in (SUITE_NODEID, MODEL_CASES_NODEID) or path.startswith(f"{MODEL_CASES_NODEID}/")
    return ours and not (invocation_dir / path).exists()


def _selects(arg: str, nodeid: str) -> bool:
    """pytest's rule for a node id argument: the node itself, its children, or its parametrizations."""
    if nodeid == arg or nodeid.startswith((f"{arg}::", f"{arg}/")):
        return True
    return "[" not in arg and nodeid.startswith(f"{arg}[")


class Selection:  # not a dataclass: making one costs about 1 ms of import in every pytest run
    """Which of the built-in suite runs: all of it unless test paths narrow the run, else the items named."""

    def __init__(self, everything: bool, named: tuple[str, ...] = ()) -> None:
        self.everything = everything
        self.named = named

    @classmethod
    def take(cls, config: pytest.Config) -> Selection:
        """Remove the suite's node ids from ``config.args`` (pytest would look for them as files)."""
        named = tuple(a for a in config.args if _names_suite(a, config.invocation_params.dir))
        if named:
            config.args = [a for a in config.args if a not in named]
        return cls(everything=not named and not _narrowed(config), named=named)

    def select(self, items: Sequence[pytest.Item], added_later: Sequence[str] = ()) -> list[pytest.Item]:
        """The items named; ``added_later``: node ids that join the run after selection, named without error."""
        if self.everything:
            return list(items)
        chosen = [item for item in items if any(_selects(arg, item.nodeid) for arg in self.named)]
        missing = [
            arg
            for arg in self.named
            if not any(_selects(arg, later) for later in added_later)
            and not any(_selects(arg, item.nodeid) for item in chosen)
        ]
        if missing:
            known = ", ".join(sorted({item.nodeid.partition("[")[0] for item in items}))
            raise pytest.UsageError(f"slmdeploy: not found: {', '.join(missing)} (the built-in items: {known})")
        return chosen


def _narrowed(config: pytest.Config) -> bool:
    """Whether test paths on the command line select less than a plain ``pytest`` would (testpaths or rootdir)."""
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        return False
    if config.option.pyargs or any("::" in arg for arg in config.args):
        return True
    given = [(config.invocation_params.dir / arg).resolve() for arg in config.args]
    defaults: Iterable[Path] = [
        Path(found).resolve()
        for pattern in config.getini("testpaths")
        for found in sorted(glob.glob(str(config.rootpath / pattern), recursive=True))
    ] or [config.rootpath.resolve()]
    return not all(any(path.is_relative_to(arg) for arg in given) for path in defaults)


def _only_informs(config: pytest.Config) -> bool:
    """A run that shows help, markers, fixtures or the collection, and so needs no usable model."""
    option = config.option
    return any(
        getattr(option, name, False)
        for name in ("help", "version", "markers", "showfixtures", "show_fixtures_per_test", "collectonly")
    )


def pytest_configure(config: pytest.Config) -> None:
    from pytest_slmdeploy.errors import SlmDeployError
    from pytest_slmdeploy.settings import resolve_models

    for line in MARKERS:
        config.addinivalue_line("markers", line)
    ini_dir = config.inipath.parent if config.inipath else config.rootpath
    try:
        models = resolve_models(lambda key: _value(config, key), ini_dir=ini_dir, cli_models=_cli_models(config),
                                only=config.getoption("slm_only", None))  # fmt: skip
    except SlmDeployError as exc:
        raise pytest.UsageError(f"slmdeploy: {exc}") from None
    settings = models[0]
    config.stash[_settings_key] = settings
    selection = Selection.take(config)
    if not settings.enabled:
        if selection.named:
            raise pytest.UsageError(f"slmdeploy: {selection.named[0]} is in the built-in suite: add --slm-model PATH")
        return
    from pytest_slmdeploy.session import SlmDeploySession

    several = len(models) > 1
    sessions = []
    for model in models:
        try:
            session = SlmDeploySession(config, model, in_run=several)
            session.check_source()
        except SlmDeployError as exc:
            if _only_informs(config):  # --help, --markers, --co ... in a fresh clone before its model is made
                return
            where = f"model {model.model_name} ({model.model}): " if several else ""
            raise pytest.UsageError(f"slmdeploy: {where}{exc}") from None
        sessions.append(session)
    config.stash[_selection_key] = selection
    if not several:
        config.stash[_session_key] = sessions[0]
        config.pluginmanager.register(sessions[0], "slmdeploy-session")
        return
    from pytest_slmdeploy.run import SlmDeployRun

    run = config.stash[_run_key] = SlmDeployRun(config, sessions)
    config.pluginmanager.register(run, "slmdeploy-run")


@pytest.hookimpl(wrapper=True)  # a wrapper runs before pytest-xdist's tryfirst hook, which makes -n N --dist load
def pytest_cmdline_main(config: pytest.Config) -> Generator[None, object, object]:
    """Several models under ``-n N`` without ``--dist``: ``--dist loadgroup``, so one worker builds, loads and
    checks each model (``--dist load`` would load every model on every worker)."""
    option = config.option
    if getattr(option, "numprocesses", None) and getattr(option, "dist", "no") == "no" and _model_count(config) > 1:
        option.dist = "loadgroup"
    return (yield)


def _model_count(config: pytest.Config) -> int:
    given = config.getoption("slm_model", None) or []
    try:
        table = config.getini("slm_models")
    except ValueError:
        table = []
    return max(len(given), len(table) if isinstance(table, list) else 0)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """In a run of several models, every test that reaches a model (an ``slm_*`` fixture) runs once per model."""
    run = metafunc.config.stash.get(_run_key, None)
    if run is not None and "slm_target" in metafunc.fixturenames:
        metafunc.parametrize("slm_target", run.names, indirect=True, scope="session", ids=run.names)


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection sees the items
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    run = config.stash.get(_run_key, None)
    single = config.stash.get(_session_key, None)
    sessions = list(run.sessions.values()) if run is not None else [single] if single is not None else []
    selection = config.stash.get(_selection_key, None)
    runs_suite = (
        bool(sessions)
        and selection is not None
        and (selection.named or (selection.everything and sessions[0].settings.suite))
    )
    if not runs_suite or selection is None:
        _give_cases(sessions, items)
        if run is not None:
            run.claim(items)
        return
    from pytest_slmdeploy.run import model_of
    from pytest_slmdeploy.session import SUITE_PATH

    # The suite lives in site-packages; fixed node ids keep it readable ("slmdeploy::test_...").
    suite = list(session.genitems(pytest.Module.from_parent(session, path=SUITE_PATH, nodeid=SUITE_NODEID)))
    for slm in sessions:
        for path in (*model_case_files(slm.plan.source.path), *slm.settings.case_files):
            models = (slm.name,) if run is not None else ()
            nodeid = f"{MODEL_CASES_NODEID}/{path.name}"
            suite.extend(session.genitems(CaseFile.from_parent(session, path=path, nodeid=nodeid, models=models)))
    with_cases = {getattr(item, "model", None) for item in (*items, *suite) if isinstance(item, CaseItem)}
    if with_cases:  # the cases are the domain family (of every model, when a case is not one model's own)
        suite = [
            item
            for item in suite
            if getattr(item, "originalname", item.name) != "test_domain_cases_exist"
            or (None not in with_cases and model_of(item) not in with_cases)
        ]
    # With a baseline the session adds the gate item after every plugin has selected: naming it is no mistake.
    gates = tuple(slm.gate_item_id for slm in sessions if slm.settings.bench_baseline)
    try:
        chosen = selection.select(suite, added_later=gates)
    except pytest.UsageError as exc:
        if not hasattr(config, "workerinput"):
            raise
        # An xdist worker's usage error never reaches the controller (the run would end in "no tests ran"):
        # a collection error does, with its message.
        config.hook.pytest_collectreport(report=pytest.CollectReport(SUITE_NODEID, "failed", str(exc), []))
        return
    if len(chosen) < len(suite):  # collected to find the named ones: the rest is reported as deselected, as -k does
        config.hook.pytest_deselected(items=[item for item in suite if item not in chosen])
    items.extend(chosen)
    # Every case collected, before -k/-m deselect: fidelity's prompt set (and its cached references) stays the same
    # whichever part of the suite a run selects.
    _give_cases(sessions, [*items, *suite])
    if run is not None:
        run.claim(items)


def _give_cases(sessions: Sequence[SlmDeploySession], items: Sequence[pytest.Item]) -> None:
    """Each model's domain cases (for fidelity's prompts and the ladder): its own, and those of every model."""
    collected = dict.fromkeys(item for item in items if isinstance(item, CaseItem))
    for slm in sessions:
        slm.cases = [item.case for item in collected if item.model in (None, slm.name)]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> CaseFile | None:
    if not is_case_file(file_path, parent.config.getini("slm_case_files")):
        return None
    config = parent.config
    run = config.stash.get(_run_key, None)
    every = [slm.settings for slm in run.sessions.values()] if run is not None else []
    settings = config.stash.get(_settings_key, None)
    if not every and settings is not None:
        every = [settings]
    found = file_path.resolve()
    for model in every:
        if model.model is not None and found.parent == model.model.resolve():
            return None  # a model's own cases run with the built-in suite, against that model
        if found in {case_file.resolve() for case_file in model.case_files}:
            return None  # an slm_models entry's cases: with the suite, against that entry's model
    return CaseFile.from_parent(parent, path=file_path, models=tuple(run.names) if run is not None else ())


def pytest_runtest_setup(item: pytest.Item) -> None:
    settings = item.config.stash.get(_settings_key, None)
    if settings is not None and not settings.enabled and any(m.name.startswith("slm_") for m in item.iter_markers()):
        pytest.skip(NO_MODEL)


def pytest_unconfigure(config: pytest.Config) -> None:
    keys: tuple[pytest.StashKey[Any], ...] = (_run_key, _session_key)  # several models' run, or one model's session
    for key in keys:
        owner = config.stash.get(key, None)
        if owner is not None:
            owner.close()
            if config.pluginmanager.is_registered(owner):
                config.pluginmanager.unregister(owner)
            del config.stash[key]


def _session(request: pytest.FixtureRequest) -> SlmDeploySession:
    return slm_session(request.config)


@pytest.fixture(scope="session")
def slm_target(request: pytest.FixtureRequest) -> Any:
    """The model this test checks (its :class:`~pytest_slmdeploy.session.SlmDeploySession`): in a run of several
    models a parameter whose id is the model's name, so ``-k NAME`` selects one; every ``slm_*`` fixture that
    reaches a model takes it."""
    run = request.config.stash.get(_run_key, None)
    if run is None:
        return _session(request)
    return run.sessions[request.param]


@pytest.fixture
def slm_figure(request: pytest.FixtureRequest) -> Any:
    """``slm_figure(name, value)`` adds a key figure to this test's checklist row (and to JUnit)."""

    from pytest_slmdeploy.report import FIGURE_PREFIX

    def record(name: str, value: object) -> None:
        request.node.user_properties.append((f"{FIGURE_PREFIX}{name}", value))

    return record


@pytest.fixture
def slm_verdict(request: pytest.FixtureRequest, slm_target: Any) -> Any:
    """``slm_verdict(comparisons)`` judges :func:`pytest_slmdeploy.stats.compare` results: fails on a decided
    failure; reports one that this run's noise left undecided as inconclusive (a failure with
    ``--slm-fail-inconclusive``)."""
    from pytest_slmdeploy.report import INCONCLUSIVE_PROPERTY
    from pytest_slmdeploy.stats import Verdicts

    def judge(comparisons: Any) -> None:
        verdicts = Verdicts.of(list(comparisons))
        request.node.user_properties.extend((INCONCLUSIVE_PROPERTY, m) for m in verdicts.inconclusive)
        if verdicts.failed:
            pytest.fail("\n".join(verdicts.failed), pytrace=False)
        if verdicts.inconclusive and slm_target.settings.fail_inconclusive:
            undecided = "\n".join(verdicts.inconclusive)
            pytest.fail(
                f"timing left undecided by this run's noise (--slm-fail-inconclusive):\n{undecided}", pytrace=False
            )

    return judge


@pytest.fixture
def slm_limits(request: pytest.FixtureRequest, slm_target: Any) -> dict[str, float]:
    """Checklist limits for this test: ini values, overridden by its ``slm_<family>(key=value)`` marker keywords."""
    from pytest_slmdeploy.errors import SettingsError
    from pytest_slmdeploy.settings import check_limit

    limits = dict(slm_target.settings.limits)
    for marker in reversed(list(request.node.iter_markers())):
        if marker.name.startswith("slm_"):
            family = marker.name.removeprefix("slm_")
            for key, value in marker.kwargs.items():
                name = key if key in limits else f"{family}_{key}"
                if name not in limits:
                    raise pytest.UsageError(f"@pytest.mark.{marker.name}({key}=...): unknown limit; see slm_* ini keys")
                try:
                    limits[name] = check_limit(name, float(value))
                except (SettingsError, TypeError, ValueError) as exc:
                    raise pytest.UsageError(f"@pytest.mark.{marker.name}({key}={value!r}): {exc}") from None
    return limits


@pytest.fixture
def slm_fidelity(slm_target: Any, slm_deployment: Any, slm_limits: dict[str, float]) -> Any:
    """``slm_fidelity(prompts=None)`` scores the installed model against its source model (teacher-forced on the
    source's greedy answers) and returns :class:`~pytest_slmdeploy.fidelity.FidelityResult`; default prompts: the
    run's domain cases, then the built-in ones. ``.references`` of the callable holds the last references."""
    from pytest_slmdeploy.fidelity import FidelityResult

    session = slm_target

    class Score:
        references: Any = None

        def __call__(self, prompts: Sequence[Any] | None = None) -> FidelityResult:
            chosen = list(prompts) if prompts is not None else session.fidelity_prompts(slm_limits)
            self.references, result = session.fidelity(chosen, slm_limits)
            return result  # type: ignore[no-any-return]

    return Score()


@pytest.fixture
def slm_benchmark(request: pytest.FixtureRequest, slm_target: Any, slm_model: Any, slm_limits: dict[str, float]) -> Any:
    """``slm_benchmark(prompt, new_tokens=32)`` times generations with pytest-benchmark and returns
    :class:`~pytest_slmdeploy.bench.GenerationStats` (TTFT, prefill/decode tok/s, spread, peak RSS, CPU)."""
    from pytest_slmdeploy.bench import LlmBenchmark

    benchmark = request.getfixturevalue("benchmark")

    def record(key: str, value: object) -> None:
        request.node.user_properties.append((key, value))

    return LlmBenchmark(benchmark, slm_model, record, slm_limits, slm_target.bench_precision())


@pytest.fixture(scope="session")
def slm_settings(slm_target: Any) -> Any:
    """The resolved :class:`~pytest_slmdeploy.settings.Settings` (of this test's model)."""
    return slm_target.settings


@pytest.fixture(scope="session")
def slm_deployment(slm_target: Any) -> Any:
    """The built and installed model (:class:`~pytest_slmdeploy.deploy.Deployment`); built once per session."""
    return slm_target.deployment()


@pytest.fixture(scope="session")
def slm_cache(slm_target: Any) -> Any:
    """The model cache (:class:`~pytest_slmdeploy.cache.ModelCache`)."""
    return slm_target.cache


@pytest.fixture(scope="session")
def slm_model(slm_target: Any) -> Any:
    """The installed model, loaded once (:class:`~pytest_slmdeploy.runtime.SlmModel`): ``generate``, ``chat``."""
    return slm_target.model()


@pytest.fixture(scope="session")
def slm_foundry_model(slm_target: Any) -> Any:
    """The installed model registered with Foundry Local and loaded through its SDK (an ``SlmModel``)."""
    return slm_target.foundry_model()
