"""A run of several models: one :class:`SlmDeploySession` per model, and the run that owns them.

Each test of the built-in suite (and each user test that takes an ``slm_*`` fixture) is parametrized with the
model it checks (``slm_target``, ids = the models' names), so ``-k NAME`` selects a model. Tests run grouped by
model, and a model's runtimes are closed before the next model's first test: one loaded model at a time. Under
pytest-xdist the run asks for ``--dist loadgroup`` with one group per model, so one worker builds, loads and
checks each model. The run routes each test report to its model (the ``slm_model`` user property, which
survives xdist) and writes one report with a row set per model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Sequence
from typing import Any

import pytest

from pytest_slmdeploy.report import FAMILY_PROPERTY, Line, write_runs_markdown
from pytest_slmdeploy.session import MODEL_PROPERTY, SlmDeploySession

TARGET = "slm_target"  # the session-scoped fixture parametrized with the models' names


def model_of(item: pytest.Item) -> str | None:
    """The model a test checks: its ``slm_target`` parameter, or a case item's or gate item's own."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and TARGET in callspec.params:
        return str(callspec.params[TARGET])
    return next((str(v) for k, v in item.user_properties if k == MODEL_PROPERTY), getattr(item, "model", None))


def model_in_nodeid(nodeid: str, names: Sequence[str]) -> str | None:
    """The model a node id names in its parameter id (``[faq-int4]``, ``[faq-int4-16]``, ``[16-faq-int4]``);
    ``names`` longest first."""
    if nodeid.rfind("@") > nodeid.rfind("]"):  # xdist's "@group" suffix, where it can still write one
        nodeid = nodeid[: nodeid.rfind("@")]
    ids = nodeid.rpartition("[")[2].removesuffix("]")
    for name in names:
        if ids == name or ids.startswith(f"{name}-") or ids.endswith(f"-{name}") or f"-{name}-" in ids:
            return name
    return None


class SlmDeployRun:
    """Registered as plugin ``slmdeploy-run`` when the run checks several models; hooks delegate per model."""

    def __init__(self, config: pytest.Config, sessions: Sequence[SlmDeploySession]) -> None:
        self.config = config
        self.sessions = {session.name: session for session in sessions}
        self._active: str | None = None
        self.reported: set[str] = set()  # the models whose tests reported (-k NAME leaves the others out)

    @property
    def names(self) -> list[str]:
        return list(self.sessions)

    def active(self) -> SlmDeploySession:
        """The session of the model whose test is running."""
        if self._active is None:
            raise pytest.UsageError(
                f"slmdeploy: this run checks {len(self.sessions)} models ({', '.join(self.sessions)}): "
                "a test reaches one through an slm_* fixture (slm_model, slm_deployment, ...)"
            )
        return self.sessions[self._active]

    def activate(self, name: str) -> None:
        """Make ``name`` the running model; every other model's loaded runtimes are closed first."""
        if name == self._active:
            return
        for other, session in self.sessions.items():
            if other != name:
                session.close()
        self._active = name

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()

    # -- pytest-xdist -------------------------------------------------------------------------------
    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """``--dist loadgroup`` with one group per model, read from the node ids. xdist's own loadgroup reads
        the ``xdist_group`` marker through a node id suffix that pytest 9.2 no longer lets it write, and then
        spreads a group over every worker in silence (pytest-xdist issue #1386)."""
        if config.getvalue("dist") != "loadgroup":
            return None
        from xdist.scheduler import LoadGroupScheduling  # type: ignore[import-untyped]

        names = sorted(self.sessions, key=len, reverse=True)  # "faq-int4" before "faq"

        class ByModel(LoadGroupScheduling):  # type: ignore[misc]
            def _split_scope(self, nodeid: str) -> str:
                return model_in_nodeid(nodeid, names) or str(super()._split_scope(nodeid))

        return ByModel(config, log)

    # -- collection -------------------------------------------------------------------------------
    def claim(self, items: list[pytest.Item]) -> None:
        """Name each test's model on it (a user property, which reaches xdist's controller, and an
        ``xdist_group`` marker per model for ``--dist loadgroup``), and order the tests model by model."""
        order = {name: i for i, name in enumerate(self.sessions)}
        for item in items:
            name = model_of(item)
            if name is None or any(k == MODEL_PROPERTY for k, _ in item.user_properties):
                continue
            item.user_properties.append((MODEL_PROPERTY, name))
            item.add_marker(pytest.mark.xdist_group(name))
        # Stable: within a model the order stays the suite's (memory last, so the session's generations count).
        items.sort(key=lambda item: order.get(model_of(item) or "", -1))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        next(iter(self.sessions.values())).pytest_collection_modifyitems(items)  # families: alike for every model

    @pytest.hookimpl(wrapper=True, specname="pytest_collection_modifyitems")
    def pytest_collection_modifyitems_gates(
        self, session: pytest.Session, items: list[pytest.Item]
    ) -> Generator[None, None, None]:
        """Each model with a baseline gets its gate item, last (see SlmDeploySession's hook of this name)."""
        yield
        if hasattr(self.config, "workerinput"):
            return
        selected = {model_of(item) for item in items}
        for slm in self.sessions.values():
            if slm.settings.bench_baseline and slm.name in selected:  # -k NAME: no gate for the models left out
                slm.add_gate_item(session, items)

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        lines = [f"slmdeploy: {len(self.sessions)} models: {', '.join(self.sessions)}"]
        for session in self.sessions.values():
            lines += session.pytest_report_header(config)
        return lines

    # -- running ----------------------------------------------------------------------------------
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        name = model_of(item)
        if name in self.sessions:
            self.activate(name)
            self.sessions[name].pytest_runtest_setup(item)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        session = self.sessions.get(model_of(item) or "")
        if session is None:
            return (yield)
        with session.measuring_other_load(item):
            return (yield)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        name = next((str(v) for k, v in report.user_properties if k == MODEL_PROPERTY), None)
        session = self.sessions.get(name or "")
        if session is not None:
            self.reported.add(session.name)
            session.pytest_runtest_logreport(report)
        elif name is None and any(k == FAMILY_PROPERTY for k, _ in report.user_properties):
            # A checklist test that reaches no model through a fixture: it speaks for every model.
            for each in self.sessions.values():
                each.pytest_runtest_logreport(report)

    def ran(self) -> list[SlmDeploySession]:
        """The models this run checked: those with a test report of their own."""
        return [s for s in self.sessions.values() if s.name in self.reported]

    # -- reporting --------------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)  # a gate reported here must reach JUnit before it writes its file
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):  # the controller writes the reports
            return
        sessions = self.ran()
        for slm in sessions:
            slm.finish(session)
        settings = next(iter(self.sessions.values())).settings  # the run-wide options are every model's
        reports = [slm.report for slm in sessions]
        if settings.report is not None:
            settings.report.parent.mkdir(parents=True, exist_ok=True)
            document = {"ok": all(r.ok for r in reports), "models": [r.to_json() for r in reports]}
            settings.report.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        if settings.bench_export is not None and any(slm.exported for slm in sessions):
            settings.bench_export.parent.mkdir(parents=True, exist_ok=True)
            exported: dict[str, list[Any]] = {}
            for slm in sessions:  # the entries' names begin with their model's
                for direction, entries in slm.exported.items():
                    exported.setdefault(direction, []).extend(entries)
            settings.bench_export.write_text(json.dumps(exported, indent=2) + "\n", encoding="utf-8")
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(write_runs_markdown(reports))

    @pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's: bench_table.take_over switches its table off
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.config.option.collectonly:
            return
        from pytest_slmdeploy import bench_table

        table = bench_table.take_over(self.config)  # one table: a row per model and length
        lines: list[Line] = []
        for slm in self.ran():
            verdict = "FAILED" if not slm.report.ok else slm.report.headline
            lines.append((f"-- {slm.name}: {verdict} --", "red" if verdict == "FAILED" else "green"))
            lines += slm.section_lines()
        if table:
            lines += [(bench_table.TITLE, ""), *[(f"  {line}", "") for line in table]]
        terminalreporter.section("slmdeploy")
        for text, colour in lines:
            terminalreporter.write_line(text, **({colour: True} if colour else {}))
