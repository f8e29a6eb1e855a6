"""The plugin's one object per pytest run: it owns the settings, the build and the loaded model."""

from __future__ import annotations

import json
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest

from pytest_slmdeploy.bench import DEFAULT_GATES, Gate, metrics_of
from pytest_slmdeploy.cache import ModelCache
from pytest_slmdeploy.deploy import Deployment, Plan, deploy, prepare
from pytest_slmdeploy.errors import BuildError, SlmDeployError
from pytest_slmdeploy.report import FAMILY_PROPERTY, FamilyResult, RunReport, family_of
from pytest_slmdeploy.settings import Settings

SUITE_PATH = Path(__file__).parent / "suite" / "test_slmdeploy_suite.py"
NO_MODEL = "no model to test: pass --slm-model PATH or set slm_model in [tool.pytest.ini_options]"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


class SlmDeploySession:
    """Registered as plugin ``slmdeploy-session``; fixtures and hooks delegate here."""

    MARKERS = (
        "slm_domain: domain-answer checks of the deployed model (checklist item 1)",
        "slm_format: response-format checks (checklist item 2)",
        "slm_memory: memory-leak checks in prolonged use (checklist item 3)",
        "slm_lengths: behaviour across input lengths (checklist item 4)",
        "slm_edge: edge cases and invalid input (checklist item 5)",
        "slm_benchmark: performance measurements of the deployed model",
        "slm_smoke: the installed model loads and answers (deployment)",
    )

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.started = time.time()
        self._plan: Plan | None = None
        self._deployment: Deployment | SlmDeployError | None = None
        self._model: Any = None
        self._foundry: Any = None
        self.report = RunReport()
        self.bench_metrics: dict[str, float] = {}
        self.bench_failures: list[str] = []
        self.bench_saved: Path | None = None
        self.gates: list[Gate] = []

    # -- stages -------------------------------------------------------------------------------
    def check_source(self) -> None:
        """Check model folder, settings and cache before collection (errors become UsageError)."""
        if self.settings.enabled:
            self.gates = [Gate.parse(g) for g in self.settings.bench_gates or DEFAULT_GATES]
            self._plan = prepare(self.settings, adjust_recipe=self._adjust_recipe)

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
                self._deployment = deploy(plan, progress=self.progress)
            except SlmDeployError as exc:
                self._deployment = exc
            except Exception as exc:  # e.g. ENOSPC while installing: one clear failure, never a retry per test
                self._deployment = BuildError(f"building {plan.name} failed: {type(exc).__name__}: {exc}")
        if isinstance(self._deployment, SlmDeployError):
            pytest.fail(f"slmdeploy: {self._deployment}", pytrace=False)
        return self._deployment

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
            return open_model(backend, deployment.entry_dir, cache_root=self.cache.root, model_name=deployment.name)
        except SlmDeployError as exc:
            pytest.fail(f"slmdeploy: {exc}", pytrace=False)

    def close(self) -> None:
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
            f"slmdeploy: {plan.source.path} ({plan.source.architecture}) -> {plan.name} [{self.settings.precision}]",
            f"slmdeploy: cache {plan.cache.entry_dir(plan.name)}: {status}",
            f"slmdeploy: fingerprint {plan.source_fingerprint[:12]}, {tools}, CPUExecutionProvider, "
            f"backend {self.settings.backend}",
        ]

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            family = family_of(m.name for m in item.iter_markers())
            if family is not None:
                item.user_properties.append((FAMILY_PROPERTY, family))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.report.record(report.nodeid, report.when, report.outcome, report.user_properties)
        if report.when == "call" and report.passed:
            self.bench_metrics.update(metrics_of(report.user_properties))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self._plan is None or hasattr(self.config, "workerinput"):  # the controller writes the reports
            return
        self.report.model = self._model_facts()
        if self.bench_metrics or self.settings.bench_baseline:
            self._finish_benchmarks(session)
        if self.settings.report is not None:
            self.settings.report.parent.mkdir(parents=True, exist_ok=True)
            self.report.write_json(str(self.settings.report))
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(self.report.to_markdown())

    def _finish_benchmarks(self, session: pytest.Session) -> None:
        """Add model figures, gate against the baseline, save to the history, export."""
        from pytest_slmdeploy import bench

        plan = self._plan
        assert plan is not None
        metrics = dict(self.bench_metrics)
        if not metrics:
            # Only reached with a baseline given: a gate with nothing to compare must fail, not pass in silence.
            self.bench_failures.append(
                f"--slm-bench-baseline {self.settings.bench_baseline} given but no benchmark ran in this session "
                "(selected out by -m/-k, skipped by --benchmark-skip, or failed)"
            )
        else:
            manifest = plan.state().manifest
            if manifest is not None:
                metrics.update(manifest.figures())
            if isinstance(self._deployment, Deployment) and self._deployment.cache_hit:
                metrics["warm_start_s"] = round(self._deployment.stage_seconds, 4)
            record = bench.RunRecord(
                name=self.settings.bench_name or time.strftime("%Y-%m-%dT%H:%M:%S"),
                model=plan.name,
                fingerprint=plan.source_fingerprint,
                precision=self.settings.precision,
                metrics=metrics,
                commit=bench.git_commit(self.config.rootpath),
            )
            history = bench.History(self.settings.bench_history or self.config.rootpath / ".slmdeploy" / "history")
            if self.settings.bench_baseline:
                baseline = history.baseline(plan.name, self.settings.bench_baseline)
                if baseline is None:
                    self.bench_failures.append(
                        f"no baseline {self.settings.bench_baseline!r} for {plan.name} in {history.folder} "
                        "(run once with --slm-bench-save, or pass a record file)"
                    )
                else:
                    self.bench_failures += bench.evaluate_gates(self.gates, metrics, baseline)
            if self.settings.bench_save:
                self.bench_saved = history.append(record)
            if self.settings.bench_export is not None:
                self.settings.bench_export.parent.mkdir(parents=True, exist_ok=True)
                exported = bench.github_action_benchmark(metrics, plan.name)
                self.settings.bench_export.write_text(json.dumps(exported, indent=2) + "\n")
        result = self.report.families.setdefault("benchmark", FamilyResult("benchmark"))
        for key in ("ttft_ms", "peak_rss_mb"):
            if key in metrics:
                result.figures[key] = metrics[key]
        if self.bench_failures:
            result.failed += len(self.bench_failures)
            result.failures += [f"gate: {f}" for f in self.bench_failures]
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _model_facts(self) -> dict[str, Any]:
        plan = self._plan
        assert plan is not None
        facts: dict[str, Any] = {"name": plan.name, "precision": self.settings.precision}
        facts["source"] = str(plan.source.path)
        manifest = plan.state().manifest
        if manifest is not None:
            facts.update(
                **manifest.figures(),
                cache="rebuilt" if manifest.created_at >= self.started else "reused",
                fingerprint=plan.source_fingerprint[:12],
            )
        return facts

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if self._plan is None and any(m.name.startswith("slm_") for m in item.iter_markers()):
            pytest.skip(NO_MODEL)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self._plan is None:
            return
        plan = self._plan
        state = plan.state()
        terminalreporter.section("slmdeploy")
        for line in self.report.terminal_lines():
            terminalreporter.write_line(line, red=line.startswith("FAIL"), green=line.startswith("pass"))
        for line in self.report.inconclusive_lines():
            terminalreporter.write_line(f"inconclusive (not a failure): {line}", yellow=True)
        for failure in self.bench_failures:
            terminalreporter.write_line(f"benchmark gate FAILED: {failure}", red=True)
        if self.bench_saved is not None:
            terminalreporter.write_line(f"benchmark history: appended to {self.bench_saved}")
        if isinstance(self._deployment, SlmDeployError):
            terminalreporter.write_line(f"deployment FAILED: {self._deployment}", red=True)
            return
        manifest = state.manifest
        if manifest is None:
            terminalreporter.write_line(f"{plan.name}: not installed ({state.reason})")
            return
        built_now = manifest.created_at >= self.started
        how = (
            f"built in {manifest.build_seconds:.1f}s (peak RSS {manifest.build_peak_rss_bytes / 1e6:.0f} MB)"
            if built_now
            else "reused from the cache (no build)"
        )
        terminalreporter.write_line(f"{plan.name} [{manifest.precision}]: {how}")
        terminalreporter.write_line(f"  installed at {plan.cache.entry_dir(plan.name)}")
        terminalreporter.write_line(
            f"  size {manifest.model_bytes / 1e6:.1f} MB = {manifest.size_ratio:.2f} x source "
            f"({manifest.source_bytes / 1e6:.1f} MB)"
        )
        if isinstance(self._deployment, Deployment):
            for note in self._deployment.notes:
                terminalreporter.write_line(f"  note: {note}", yellow=True)
        foundry_model = self._foundry or (self._model if self.settings.backend == "foundry" else None)
        if foundry_model is not None:
            registration = foundry_model.backend.registration
            terminalreporter.write_line(
                f"  Foundry Local: registered as {registration.model_id} (foundry-local-sdk {registration.sdk_version})"
            )
