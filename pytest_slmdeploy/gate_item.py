"""``slmdeploy::benchmark_gates``: the test item that judges a model's benchmark gates, as pytest collects it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import pytest

from pytest_slmdeploy.report import FAMILY_PROPERTY, INCONCLUSIVE_PROPERTY, GateResult


class GateJudge(Protocol):
    """What the gate item asks of a model's session (:class:`~pytest_slmdeploy.session.SlmDeploySession`)."""

    @property
    def gate_item_id(self) -> str: ...

    def model_properties(self) -> list[tuple[str, str]]: ...

    def judge_gates(self, *, by_item: bool = False) -> GateResult: ...


class GateFailure(Exception):
    """The benchmark gates failed: the message holds the reasons, one per line."""


class BenchmarkGates(pytest.Collector):
    """Collects the gate item (through a collector, so pytest counts it among the collected tests)."""

    def __init__(self, *, slm: GateJudge, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slm = slm

    def collect(self) -> list[pytest.Item]:
        nodeid = self.slm.gate_item_id
        name = nodeid.partition("::")[2]
        return [BenchmarkGatesItem.from_parent(self, name=name, nodeid=nodeid, slm=self.slm)]


class BenchmarkGatesItem(pytest.Item):
    """Judges the gates on the metrics of the benchmarks that ran before it."""

    def __init__(self, *, slm: GateJudge, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slm = slm
        self.user_properties += [(FAMILY_PROPERTY, "benchmark"), *slm.model_properties()]

    def runtest(self) -> None:
        verdict = self.slm.judge_gates(by_item=True)
        if verdict.failed:
            raise GateFailure("\n".join(verdict.reasons))
        if verdict.status == "inconclusive":
            self.user_properties += [(INCONCLUSIVE_PROPERTY, reason) for reason in verdict.reasons]

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, GateFailure):
            return str(excinfo.value)  # the reasons, first line first: the short summary shows it
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.slm.gate_item_id
