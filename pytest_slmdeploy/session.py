"""The plugin's one object per pytest run: it owns the settings, the build and the loaded model."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest

from pytest_slmdeploy import measure
from pytest_slmdeploy.bench import BUSY_CPUS, DEFAULT_GATES, Gate, metrics_of
from pytest_slmdeploy.cache import ModelCache
from pytest_slmdeploy.deploy import Deployment, Plan, deploy, prepare
from pytest_slmdeploy.errors import BuildError, SlmDeployError, describe
from pytest_slmdeploy.gate_item import BenchmarkGates
from pytest_slmdeploy.report import (
    FAMILY_PROPERTY,
    INCONCLUSIVE_PROPERTY,
    FamilyResult,
    GateResult,
    Installed,
    RunReport,
    family_of,
)
from pytest_slmdeploy.settings import AUTO_PRECISION, NO_MODEL, Settings

SUITE_PATH = Path(__file__).parent / "suite" / "test_slmdeploy_suite.py"
GATE_ITEM_ID = "slmdeploy::benchmark_gates"
MODEL_PROPERTY = "slm_model"  # user property: the model a test checked, in a run of several models


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


class SlmDeploySession:
    """Registered as plugin ``slmdeploy-session``; fixtures and hooks delegate here."""

    def __init__(self, config: pytest.Config, settings: Settings, *, in_run: bool = False) -> None:
        self.config = config
        self.settings = settings
        self.in_run = in_run  # one of several models: the run (run.SlmDeployRun) writes the reports
        self.started = time.time()
        self._plan: Plan | None = None
        self._deployment: Deployment | SlmDeployError | None = None
        self._model: Any = None
        self._foundry: Any = None
        self._registration: Any = None  # the Foundry Local registration (foundry.Registration), once loaded
        self.report = RunReport()
        self.bench_metrics: dict[str, float] = {}
        self._alone: dict[str, float] | None = None
        self.alone_figures: dict[str, float] = {}  # everything the child measured (rounds and tokens too)
        self.gate_result: GateResult | None = None
        self.gate_item_collected = self.gate_item_ran = False
        self.bench_saved: Path | None = None
        self.exported: dict[str, list[dict[str, Any]]] = {}  # this run's metrics for github-action-benchmark
        self.gates: list[Gate] = []
        self.cases: list[Any] = []  # the run's domain cases (checklist.cases.Case), for fidelity and the ladder
        self.ladder: Any = None  # the precision ladder's result (ladder.Ladder) with --slm-precision auto
        self._fidelity: dict[tuple[Path, str], Any] = {}  # (entry, references key) -> FidelityResult
        self.shared_runs: dict[tuple[str, int], list[Any]] = {}  # (prompt, new tokens) -> the length sweep's rounds
        self._spinning: tuple[bool, str] | None = None
        self.other_load = measure.OtherLoad()  # other processes' CPU use over the run (the gates read it)

    @property
    def name(self) -> str:
        """The model's name in the run: its cache entry's (the ladder's rungs add their precision to it)."""
        return self.settings.model_name

    @property
    def gate_item_id(self) -> str:
        return f"{GATE_ITEM_ID}[{self.name}]" if self.in_run else GATE_ITEM_ID

    def spinning(self) -> tuple[bool, str]:
        """Whether ONNX Runtime GenAI's threads spin while they wait, and why: ``slm_spinning``, and with ``auto``
        (the default) off when other processes already keep a CPU or more busy as the run starts. Spinning is
        fastest on a quiet machine (SmolLM2 int4-mixed, 2 threads: 140 against 114 tok/s) and slowest beside two
        busy processes (61 against 92 tok/s); decided once, so every figure of the run is taken alike."""
        if self._spinning is None:
            mode = self.settings.spinning
            if mode != "auto":
                self._spinning = (mode == "on", f"slm_spinning = {mode}")
            else:
                busy = measure.cpus_busy_elsewhere()
                quiet = busy < BUSY_CPUS
                self._spinning = (quiet, f"other processes used {busy:.1f} CPUs as the run started")
        return self._spinning

    def _threads_label(self) -> str:
        if self.settings.backend == "foundry":  # the SDK takes no thread setting: ORT GenAI's default for the entry
            return "Foundry Local's threads"
        spinning, why = self.spinning()
        return f"{_threads_text(self.settings)}, spinning {'on' if spinning else 'off'} ({why})"

    def bench_precision(self) -> dict[str, float]:
        """How precise the history's figures must be: as the gates need them when this run is judged against a
        baseline or saved as a future one; otherwise nothing judges them and the minimum rounds do."""
        from pytest_slmdeploy.bench import precision_for

        if self.settings.bench_baseline or self.settings.bench_save:
            return precision_for(self.gates)
        return {}

    # -- stages -------------------------------------------------------------------------------
    def check_source(self) -> None:
        """Check model folder, settings and cache before collection (errors become UsageError)."""
        if self.settings.enabled:
            self.gates = [Gate.parse(g) for g in self.settings.bench_gates or DEFAULT_GATES]
            settings = self.settings
            if self.auto_precision:  # the first rung's plan checks the source; the ladder picks the build later
                from pytest_slmdeploy.ladder import RUNGS, rung_settings

                settings = rung_settings(settings, RUNGS[0])
            self._plan = prepare(settings, adjust_recipe=self._adjust_recipe)

    @property
    def auto_precision(self) -> bool:
        return self.settings.precision == AUTO_PRECISION

    def _adjust_recipe(self, recipe: dict[str, Any]) -> dict[str, Any]:
        changed = self.config.hook.pytest_slmdeploy_recipe(recipe=recipe, settings=self.settings, config=self.config)
        return recipe if changed is None else dict(changed)

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            pytest.skip(NO_MODEL)
        return self._plan

    @property
    def cache(self) -> ModelCache:
        return self._plan.cache if self._plan else ModelCache(self.settings.cache_dir)

    def deployment(self) -> Deployment:
        """Build and install once; a failure is remembered and reported once per dependent test."""
        plan = self.plan
        if self._deployment is None:
            try:
                self._deployment = self._climb() if self.auto_precision else deploy(plan, progress=self.progress)
            except SlmDeployError as exc:
                self._deployment = exc
            except Exception as exc:  # e.g. ENOSPC while installing: one clear failure, never a retry per test
                self._deployment = BuildError(f"building {plan.name} failed: {describe(exc)}")
        if isinstance(self._deployment, SlmDeployError):
            pytest.fail(f"slmdeploy: {self._deployment}", pytrace=False)
        return self._deployment

    def _climb(self) -> Deployment:
        """``--slm-precision auto``: build and judge int4, int8, fp32 in turn; the tests run on the first that
        passes (or on the most faithful, when none does), and the notes say why the others were rejected."""
        from pytest_slmdeploy.ladder import run_ladder

        limits = self.settings.limits
        ladder, judge = run_ladder(
            self.settings,
            prompts=self.fidelity_prompts(limits),
            limits=limits,
            cases=self.cases,
            measure_speed=True,  # every rung's row names its size, speed and fidelity
            adjust_recipe=self._adjust_recipe,
            progress=self.progress,
        )
        self.ladder = ladder
        precision = ladder.chosen or ladder.rungs[-1].precision
        self._plan = judge.plans[precision]
        for rung in ladder.rungs:
            if rung.fidelity is not None:
                self._fidelity[(judge.deployments[rung.precision].entry_dir, rung.fidelity.references_key)] = (
                    rung.fidelity
                )
        chosen = judge.deployments[precision]
        return dataclasses.replace(chosen, notes=(*chosen.notes, *ladder.notes()))

    def fidelity_prompts(self, limits: Mapping[str, float]) -> list[Any]:
        """The run's domain conversations, then the built-in prompts: what fidelity is scored on."""
        from pytest_slmdeploy.checklist.format import GENERIC_PROMPTS
        from pytest_slmdeploy.fidelity import prompt_set

        domain = [case.messages for case in self.cases]
        return prompt_set(domain, GENERIC_PROMPTS, limit=int(limits["fidelity_max_prompts"]))

    def fidelity(self, prompts: Sequence[Any], limits: Mapping[str, float]) -> tuple[Any, Any]:
        """(references, result): the installed model scored against the source on ``prompts``; references are
        computed once per source and prompt set (kept in the cache), each score once per session."""
        from pytest_slmdeploy import fidelity

        deployment = self.deployment()
        try:
            references = fidelity.compute_references(
                self.plan.source.path,
                prompts,
                max_new_tokens=int(limits["fidelity_max_new_tokens"]),
                cache_dir=self.cache.root,
                trust_remote_code=self.settings.trust_remote_code,
                progress=self.progress,
            )
            key = (deployment.entry_dir, references.key)
            if key not in self._fidelity:
                # The session's own loaded model where it is an ORT GenAI one: no second copy to load.
                loaded = self.model().backend.model if self.settings.backend == "ort-genai" else None
                self._fidelity[key] = fidelity.score(deployment.entry_dir, references, progress=self.progress,
                                                     threads=self.settings.threads, model=loaded)  # fmt: skip
        except SlmDeployError as exc:
            pytest.fail(f"slmdeploy: {exc}", pytrace=False)
        return references, self._fidelity[key]

    def model(self) -> Any:
        """The model loaded in the configured backend, once per session."""
        if self._model is None:
            self._model = self._open(self.settings.backend)
        return self._model

    def foundry_model(self) -> Any:
        """The model registered with Foundry Local and loaded through its SDK."""
        if self.settings.backend == "foundry":
            return self.model()
        if self.settings.foundry == "no":
            pytest.skip("Foundry Local registration is off (slm_foundry = no)")
        from pytest_slmdeploy import foundry

        if not foundry.sdk_available():
            message = "foundry-local-sdk is not installed: pip install 'pytest-slmdeploy[foundry]'"
            if self.settings.foundry == "yes":
                pytest.fail(f"slmdeploy: {message}", pytrace=False)
            pytest.skip(message)
        if self._foundry is None:
            self._foundry = self._open("foundry")
        return self._foundry

    def _open(self, backend: str) -> Any:
        from pytest_slmdeploy.runtime import open_model

        deployment = self.deployment()
        try:
            spinning = self.spinning()[0] if backend == "ort-genai" else None
            return open_model(backend, deployment.entry_dir, cache_root=self.cache.root, model_name=deployment.name,
                              threads=self.settings.threads, spinning=spinning)  # fmt: skip
        except SlmDeployError as exc:
            pytest.fail(f"slmdeploy: {exc}", pytrace=False)

    def close(self) -> None:
        foundry_model = self._foundry or (self._model if self.settings.backend == "foundry" else None)
        if foundry_model is not None:  # the summary names it after the model is closed (several models: at once)
            self._registration = foundry_model.backend.registration
        for model in (self._foundry, self._model):
            if model is not None:
                model.close()
        if self._foundry is not None or self.settings.backend == "foundry":
            from pytest_slmdeploy.foundry import close_manager

            close_manager()
        self._model = self._foundry = None

    def progress(self, message: str) -> None:
        """Show build progress live, even while pytest captures output."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"slmdeploy: {message}")
        else:
            reporter.write_line(f"slmdeploy: {message}")

    # -- pytest hooks -------------------------------------------------------------------------
    def _precision_label(self) -> str:
        if not self.auto_precision:
            return self.settings.precision
        from pytest_slmdeploy.ladder import RUNGS

        return f"auto: smallest faithful of {', '.join(RUNGS)}"

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        if self._plan is None:
            return []
        plan = self._plan
        state = plan.state()
        status = "installed, up to date" if state.usable else f"will build ({state.reason})"
        if state.usable and self.settings.rebuild:
            status = "installed; will rebuild (--slm-rebuild)"
        tools = ", ".join(f"{p} {_version(p)}" for p in ("olive-ai", "onnxruntime-genai", "onnxruntime"))
        return [
            f"slmdeploy: {plan.source.path} ({plan.source.architecture}) -> {plan.name} [{self._precision_label()}]",
            f"slmdeploy: cache {plan.cache.entry_dir(plan.name)}: {status}",
            f"slmdeploy: fingerprint {plan.source_fingerprint[:12]}, {tools}, CPUExecutionProvider, "
            f"backend {self.settings.backend}, {self._threads_label()}",
        ]

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            family = family_of(m.name for m in item.iter_markers())
            if family is not None:
                item.user_properties.append((FAMILY_PROPERTY, family))

    @pytest.hookimpl(wrapper=True, specname="pytest_collection_modifyitems")
    def pytest_collection_modifyitems_gates(
        self, session: pytest.Session, items: list[pytest.Item]
    ) -> Generator[None, None, None]:
        """With a baseline, the gate item goes last, after every plugin has selected and ordered the items
        (so it runs after the benchmarks, and -k/-m cannot leave it out). Not on xdist workers: a worker sees
        only its own benchmarks, so the controller judges the gates at the end (:meth:`_finish_benchmarks`)."""
        yield
        if self._plan is not None and self.settings.bench_baseline and not hasattr(self.config, "workerinput"):
            self.add_gate_item(session, items)

    def add_gate_item(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        items.extend(session.genitems(BenchmarkGates.from_parent(session, name="slmdeploy", slm=self)))
        self.gate_item_collected = True

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        for model in (self._model, self._foundry):  # generations of another test: another memory segment
            if model is not None:
                model.segment += 1

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):  # (file, line, "Skipped: why")
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        self.report.record(report.nodeid, report.when, report.outcome, report.user_properties, reason)
        if report.when == "call" and report.passed:
            self.bench_metrics.update(metrics_of(report.user_properties))

    @pytest.hookimpl(tryfirst=True)  # a gate reported here must reach JUnit before it writes its file
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self._plan is None or hasattr(self.config, "workerinput"):  # the controller writes the reports
            return
        self.finish(session)
        if self.settings.report is not None:
            self.settings.report.parent.mkdir(parents=True, exist_ok=True)
            self.report.write_json(str(self.settings.report))
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(self.report.to_markdown())

    def finish(self, session: pytest.Session) -> None:
        """Complete the report: the model's facts and notes, the ladder, the gates, the history."""
        self.report.model = self._model_facts()
        self.report.notes = list(self._notes())
        if self.ladder is not None:
            self.report.ladder = self.ladder.to_json()
            self.report.ladder_table = self.ladder.table()
        if self.bench_metrics or self.settings.bench_baseline:
            self._finish_benchmarks(session)

    def _finish_benchmarks(self, session: pytest.Session) -> None:
        """Judge the gates (unless the gate item did), save the run to the history, export, report."""
        from pytest_slmdeploy import bench

        plan = self._plan
        assert plan is not None
        verdict = None
        if self.settings.bench_baseline and not self.config.option.collectonly:
            verdict = self.judge_gates()
            if not self.gate_item_ran:  # xdist's controller, or a run stopped before the item (-x, --maxfail)
                self._report_gates(session, verdict)
        metrics = self._run_metrics()
        if metrics:
            record = bench.RunRecord(
                name=self.settings.bench_name or time.strftime("%Y-%m-%dT%H:%M:%S"),
                model=plan.name,
                fingerprint=plan.source_fingerprint,
                precision=plan.settings.precision,
                metrics=metrics,
                commit=bench.git_commit(self.config.rootpath),
                details={"busy_cpus": round(self.other_load.cpus(), 2)},  # a busy run's timings gate nothing
            )
            if self.settings.bench_save:  # after the gates: "last" is the run before this one
                self.bench_saved = self._history().append(record)
            self.exported = bench.github_action_benchmark(metrics, plan.name)
            if self.settings.bench_export is not None and not self.in_run:  # the run writes all models' at once
                self.settings.bench_export.parent.mkdir(parents=True, exist_ok=True)
                self.settings.bench_export.write_text(json.dumps(self.exported, indent=2) + "\n")
        for key in ("ttft_ms", "peak_rss_mb"):
            if key in metrics:  # not when only the fidelity family's figures reached the history
                self.report.families.setdefault("benchmark", FamilyResult("benchmark")).figures[key] = metrics[key]
        alone = self.alone_figures
        if bench.CPU_PER_TOKEN in metrics and alone:
            self.report.families.setdefault("benchmark", FamilyResult("benchmark")).figures[bench.CPU_PER_TOKEN] = (
                f"{alone['decode_cpu_us']:g} (the least of {alone['rounds']:g} rounds, {alone['tokens']:g} tokens, "
                "on 1 thread)"
            )
        self.report.gates = verdict  # the gate item itself counts in the benchmark row, as its report came in
        if verdict is not None and verdict.failed:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _history(self) -> Any:
        from pytest_slmdeploy import bench

        return bench.History(self.settings.bench_history or self.config.rootpath / ".slmdeploy" / "history")

    def _model_alone(self, entry_dir: Path) -> dict[str, float]:
        """``peak_rss_mb`` and ``decode_cpu_us``: the installed model alone in a fresh process, once per session
        (measure.model_alone); the pytest process also holds Olive, torch and the source model, so its own peak is
        no model figure. The child decodes on one thread that does not spin, so its CPU time per token is the work
        the model does: a figure other processes on the machine do not move, which the gates decide on a busy run."""
        if self._alone is None:
            from pytest_slmdeploy.bench import CPU_PER_TOKEN

            new_tokens = int(self.settings.limits["benchmark_new_tokens"])
            try:
                figures = measure.model_alone(entry_dir, measure.CPU_PROMPT_TOKENS, new_tokens, rounds=3, threads=1,
                                              spinning=False, seconds=measure.CPU_SECONDS)  # fmt: skip
                self._alone = {"peak_rss_mb": figures["peak_rss_mb"], CPU_PER_TOKEN: figures["decode_cpu_us"]}
                self.alone_figures = figures
            except SlmDeployError as exc:
                self.report.notes.append(f"the model alone in a process of its own not measured: {exc}")
                self._alone = {}
        return self._alone

    def _run_metrics(self) -> dict[str, float]:
        """The benchmarks' metrics so far, with the build's figures and the warm start (empty if none ran)."""
        metrics = dict(self.bench_metrics)
        if metrics and self._plan is not None:
            state = self._plan.state()
            manifest = state.manifest
            if manifest is not None:
                metrics.update(manifest.figures())
            if state.usable:
                metrics.update(self._model_alone(self._plan.cache.entry_dir(self._plan.name)))
            if isinstance(self._deployment, Deployment) and self._deployment.cache_hit:
                metrics["warm_start_s"] = round(self._deployment.stage_seconds, 4)
        return metrics

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        with self.measuring_other_load(item):
            return (yield)

    @contextlib.contextmanager
    def measuring_other_load(self, item: pytest.Item) -> Iterator[None]:
        """Other processes' load is measured while the timed tests run (the gates judge their figures)."""
        timed = any(item.get_closest_marker(name) for name in ("slm_benchmark", "slm_lengths"))
        if timed:
            self.other_load.resume()
        try:
            yield
        finally:
            if timed:
                self.other_load.pause()

    def judge_gates(self, *, by_item: bool = False) -> GateResult:
        """The gates' verdict on the metrics recorded so far, judged once: by the gate item or at the end."""
        self.gate_item_ran |= by_item
        if self.gate_result is None:
            verdict = self._judge_gates()
            if self.in_run:  # one of several models: each reason names it
                verdict = dataclasses.replace(verdict, summary=f"{self.name}: {verdict.summary}",
                                              reasons=tuple(f"{self.name}: {r}" for r in verdict.reasons))  # fmt: skip
            self.gate_result = verdict
        return self.gate_result

    def _judge_gates(self) -> GateResult:
        from pytest_slmdeploy import bench

        plan, which = self.plan, self.settings.bench_baseline
        assert which is not None
        if not self.bench_metrics:  # a gate with nothing to compare must fail, not pass in silence
            return GateResult(
                "failed",
                "benchmark gates FAILED",
                (
                    f"--slm-bench-baseline {which} given but no benchmark ran in this session "
                    "(selected out by -m/-k, skipped by --benchmark-skip, or failed)",
                ),
            )
        history = self._history()
        baseline = history.baseline(plan.name, which)
        if baseline is None and which == "last":  # the first run: nothing to compare yet, and it says so
            saved = "saved with --slm-bench-save" if self.settings.bench_save else "save it with --slm-bench-save"
            return GateResult("bootstrap", f"no baseline yet for {plan.name}: this run becomes the baseline ({saved})")
        if baseline is None:  # a NAME or FILE the user chose that is not there is a mistake, not a first run
            return GateResult(
                "failed",
                "benchmark gates FAILED",
                (
                    f"no baseline {which!r} for {plan.name} in {history.folder} "
                    "(run once with --slm-bench-save, or pass a record file)",
                ),
            )
        return bench.judge(self.gates, self._run_metrics(), baseline, busy_cpus=self.other_load.cpus(),
                           fail_inconclusive=self.settings.fail_inconclusive)  # fmt: skip

    def _report_gates(self, session: pytest.Session, verdict: GateResult) -> None:
        """Report the verdict as the test ``slmdeploy::benchmark_gates`` when no gate item ran here."""
        nodeid = self.gate_item_id
        location = ("slmdeploy", None, nodeid)
        if not self.gate_item_collected:
            session.testscollected += 1  # one more test of the run (the progress counts it)
        hook = self.config.hook
        hook.pytest_runtest_logstart(nodeid=nodeid, location=location)
        for when in ("setup", "call", "teardown"):
            failed = when == "call" and verdict.failed
            properties = [(FAMILY_PROPERTY, "benchmark"), *self.model_properties()]
            if when == "call" and verdict.status == "inconclusive":
                properties += [(INCONCLUSIVE_PROPERTY, reason) for reason in verdict.reasons]
            report = pytest.TestReport(
                nodeid,
                location,
                {},
                "failed" if failed else "passed",
                "\n".join(verdict.reasons) if failed else None,
                when,
                user_properties=properties,
            )
            hook.pytest_runtest_logreport(report=report)
        hook.pytest_runtest_logfinish(nodeid=nodeid, location=location)

    def model_properties(self) -> list[tuple[str, str]]:
        """The user property that names this model on its tests' reports, in a run of several models."""
        return [(MODEL_PROPERTY, self.name)] if self.in_run else []

    def _how_built(self, manifest: Any) -> str:
        """``built`` by this run, ``waited`` for another process's build, or ``reused`` as it was."""
        new = manifest.created_at >= self.started
        if isinstance(self._deployment, Deployment):  # this process deployed: it knows whether it built
            return "built" if not self._deployment.cache_hit else ("waited" if new else "reused")
        return "built" if new else "reused"  # the xdist controller: a worker of this run built it

    def _notes(self) -> tuple[str, ...]:
        """What the user should know about this deployment (an xdist controller has only the plan's)."""
        if isinstance(self._deployment, Deployment):
            return self._deployment.notes
        return self._plan.notes if self._plan is not None else ()

    def _model_facts(self) -> dict[str, Any]:
        plan = self._plan
        assert plan is not None
        facts: dict[str, Any] = {"name": plan.name, "precision": plan.settings.precision}
        facts["source"] = str(plan.source.path)
        manifest = plan.state().manifest
        if manifest is not None:
            facts.update(
                **manifest.figures(),
                cache="rebuilt" if self._how_built(manifest) == "built" else "reused",
                fingerprint=plan.source_fingerprint[:12],
            )
        return facts

    @pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's: bench_table.take_over switches its table off
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self._plan is None or self.config.option.collectonly:
            return
        from pytest_slmdeploy import bench_table

        lines = self.section_lines(bench_table.TITLE, bench_table.take_over(self.config))
        terminalreporter.section("slmdeploy")
        for text, colour in lines:
            terminalreporter.write_line(text, **({colour: True} if colour else {}))

    def section_lines(self, bench_title: str = "", bench_table: Sequence[str] = ()) -> list[tuple[str, str]]:
        """This model's lines of the ``slmdeploy`` section: the checklist, then the installed model."""
        plan = self.plan
        state = plan.state()
        lines = self.report.summary_lines(bench_title, bench_table, self.bench_saved)
        manifest = state.manifest
        if isinstance(self._deployment, SlmDeployError):
            lines.append((f"deployment FAILED: {self._deployment}", "red"))
        elif manifest is None:
            lines.append((f"{plan.name}: not installed ({state.reason})", ""))
        else:
            lines += self._installed(manifest).lines()
        return lines

    def _installed(self, manifest: Any) -> Installed:
        plan = self.plan
        built = f"built in {manifest.build_seconds:.1f}s (peak RSS {manifest.build_peak_rss_bytes / 1e6:.0f} MB)"
        how = {
            "built": built,
            "waited": "reused from the cache: another process built it while this run waited",
            "reused": "reused from the cache (no build)",
        }[self._how_built(manifest)]
        foundry = None
        live = self._foundry or (self._model if self.settings.backend == "foundry" else None)
        registration = live.backend.registration if live is not None else self._registration
        if registration is not None:
            foundry = f"registered as {registration.model_id} (foundry-local-sdk {registration.sdk_version})"
        return Installed(
            name=plan.name,
            precision=manifest.precision,
            how=how,
            entry_dir=str(plan.cache.entry_dir(plan.name)),
            model_bytes=manifest.model_bytes,
            size_ratio=manifest.size_ratio,
            source_bytes=manifest.source_bytes,
            notes=tuple(self._notes()),
            ladder=tuple(self.ladder.table()) if self.ladder is not None else (),
            foundry=foundry,
        )


def _threads_text(settings: Settings) -> str:
    if not settings.threads:
        return "ONNX Runtime GenAI's default threads"
    return f"{settings.threads} thread{'s' if settings.threads != 1 else ''}"
