"""Stage 7: the run's checklist, as a terminal table, JSON and Markdown (CI step summary).

Tests tag their report with a family and figures through ``user_properties``
(``("slm_family", "domain")``, ``("slm:stop rate", "12/12")``), so the
same numbers reach JUnit XML and survive pytest-xdist, where only reports
travel from the workers to the controller.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

Line = tuple[str, str]  # a terminal line and its colour: "", "red", "green" or "yellow"

FAMILY_PROPERTY = "slm_family"
INCONCLUSIVE_PROPERTY = "slm_inconclusive"  # a timing verdict this run's noise could not decide (the message)
FIGURE_PREFIX = "slm:"  # user property "slm:<figure name>" -> value; JUnit shows it as is

# The tutorial's quality checklist, in its order, then the deployment and benchmark families.
FAMILIES: dict[str, str] = {
    "smoke": "Installed in the Foundry Local cache, loads and answers",
    "domain": "1. Answers queries from its fine-tuned domain",
    "format": "2. Response format matches the expected structure",
    "memory": "3. No memory leaks during prolonged use",
    "lengths": "4. Consistent performance across input lengths",
    "edge": "5. Handles edge cases and invalid input",
    "fidelity": "6. Faithful to the fine-tuned source",
    "benchmark": "Benchmark",
}
MARKER_PREFIX = "slm_"


def family_of(marker_names: Iterable[str]) -> str | None:
    """The checklist family of a test, from its ``slm_<family>`` marker."""
    for name in marker_names:
        family = name.removeprefix(MARKER_PREFIX)
        if name.startswith(MARKER_PREFIX) and family in FAMILIES:
            return family
    return None


@dataclass
class FamilyResult:
    """Outcomes and key figures of one checklist family."""

    family: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    inconclusive: list[str] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)  # why each skipped test did not run (its skip message)

    @property
    def title(self) -> str:
        return FAMILIES[self.family]

    @property
    def status(self) -> str:
        if self.failed:
            return "FAIL"
        return "pass" if self.passed else "skipped"


@dataclass(frozen=True)
class GateResult:
    """The benchmark gates' verdict: ``passed`` (its figures), ``failed`` (the reasons), ``inconclusive``
    (timing gates a busy machine left undecided: the reasons) or ``bootstrap`` (no baseline yet; this run can
    become it)."""

    status: str
    summary: str
    reasons: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "summary": self.summary, "reasons": list(self.reasons)}

    def to_markdown(self) -> list[str]:
        if self.failed:
            return [f"❌ **{self.summary}**", "", *[f"- {reason}" for reason in self.reasons]]
        if self.status == "inconclusive":  # the reasons are listed with the run's other undecided verdicts
            return [f"⚠️ {self.summary}"]
        return [f"{'✅' if self.status == 'passed' else '🆕'} {self.summary}"]


@dataclass
class RunReport:
    """Everything the checklist table, the JSON report and the Markdown summary show."""

    model: dict[str, Any] = field(default_factory=dict)
    families: dict[str, FamilyResult] = field(default_factory=dict)
    gates: GateResult | None = None
    notes: list[str] = field(default_factory=list)  # about the deployment, e.g. where PromptTemplate differs
    ladder: dict[str, Any] | None = None  # --slm-precision auto: {"chosen", "rungs"} (ladder.Ladder.to_json)
    ladder_table: list[str] = field(default_factory=list)  # its Markdown table

    def record(
        self,
        nodeid: str,
        when: str,
        outcome: str,
        user_properties: Iterable[tuple[str, Any]],
        skip_reason: str = "",
    ) -> None:
        """Count one test report (call phase, or a failed/skipped setup) into its family."""
        props = list(user_properties)
        family = next((v for k, v in props if k == FAMILY_PROPERTY), None)
        if family not in FAMILIES:
            return
        result = self.families.setdefault(family, FamilyResult(family))
        for key, value in props:
            if isinstance(key, str) and key.startswith(FIGURE_PREFIX):
                result.figures[key.removeprefix(FIGURE_PREFIX)] = value
            elif key == INCONCLUSIVE_PROPERTY and when == "call":
                result.inconclusive.append(str(value))
        if when == "call" or outcome != "passed":
            if outcome == "passed":
                result.passed += 1
            elif outcome == "failed":
                result.failed += 1
                result.failures.append(nodeid)
            else:
                result.skipped += 1
                result.skips.append(skip_reason or nodeid)

    @property
    def ok(self) -> bool:
        return not any(r.failed for r in self.families.values()) and not (self.gates and self.gates.failed)

    def not_checked(self) -> list[str]:
        """What this run did not check: each skipped test of a family, with its reason (a pass says nothing of
        it). A family whose tests all skipped reads as skipped everywhere, never as passed."""
        return [f"{r.title}: {reason}" for r in self.ordered() for reason in r.skips]

    @property
    def headline(self) -> str:
        """``passed``, ``FAILED``, or ``passed, N not checked`` when some checks did not run."""
        if not self.ok:
            return "FAILED"
        skipped = len(self.not_checked())
        return f"passed, {skipped} not checked" if skipped else "passed"

    def ordered(self) -> list[FamilyResult]:
        return [self.families[f] for f in FAMILIES if f in self.families]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "ok": self.ok,
            "headline": self.headline,
            "not_checked": self.not_checked(),
            "families": [
                {
                    "family": r.family,
                    "title": r.title,
                    "status": r.status,
                    "passed": r.passed,
                    "failed": r.failed,
                    "skipped": r.skipped,
                    "figures": r.figures,
                    "failures": r.failures,
                    "inconclusive": r.inconclusive,
                    "skips": r.skips,
                }
                for r in self.ordered()
            ],
            "gates": self.gates.to_json() if self.gates else None,
            "notes": self.notes,
            "ladder": self.ladder,
            "ladder_table": self.ladder_table,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunReport:
        """A report as :meth:`to_json` wrote it (to merge the reports of several CI jobs)."""
        families = {}
        for item in data.get("families", []):
            keys = ("passed", "failed", "skipped", "figures", "failures", "inconclusive", "skips")
            fields = {k: item[k] for k in keys if k in item}
            families[item["family"]] = FamilyResult(item["family"], **fields)
        gates = data.get("gates")
        return cls(
            model=dict(data.get("model", {})),
            families=families,
            gates=GateResult(gates["status"], gates["summary"], tuple(gates.get("reasons", ()))) if gates else None,
            notes=list(data.get("notes", [])),
            ladder=data.get("ladder"),
            ladder_table=list(data.get("ladder_table", [])),
        )

    def write_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_json(), fh, indent=2, default=str)
            fh.write("\n")

    def table_rows(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for r in self.ordered():
            counts = f"{r.passed}/{r.passed + r.failed}" + (f" ({r.skipped} skipped)" if r.skipped else "")
            if r.inconclusive:
                counts += f" ({len(r.inconclusive)} inconclusive)"
            figures = ", ".join(f"{k} {_fmt(v)}" for k, v in r.figures.items())
            rows.append((r.status, r.title, counts, figures))
        return rows

    def terminal_lines(self) -> list[str]:
        rows = self.table_rows()
        if not rows:
            return []
        width = max(len(title) for _, title, _, _ in rows)
        return [
            f"{status:<7} {title:<{width}}  {counts:<8} {figures}".rstrip() for status, title, counts, figures in rows
        ]

    def inconclusive_lines(self) -> list[str]:
        return [f"{r.title}: {message}" for r in self.ordered() for message in r.inconclusive]

    def summary_lines(
        self, bench_title: str = "", bench_table: Sequence[str] = (), saved: object | None = None
    ) -> list[Line]:
        """The ``slmdeploy`` section's verdicts: checklist rows, what was not checked or not decided, the
        benchmark table, the gates and where the run was saved."""
        lines: list[Line] = []
        for line in self.terminal_lines():
            lines.append((line, "red" if line.startswith("FAIL") else "green" if line.startswith("pass") else ""))
        lines += [(f"not checked (skipped): {line}", "yellow") for line in self.not_checked()]
        lines += [(f"inconclusive (not a failure): {line}", "yellow") for line in self.inconclusive_lines()]
        if bench_table:
            lines += [(bench_title, ""), *[(f"  {line}", "") for line in bench_table]]
        gates = self.gates
        if gates is not None and gates.failed:
            lines += [(f"benchmark gate FAILED: {reason}", "red") for reason in gates.reasons]
        elif gates is not None:  # an undecided gate's reasons are among the inconclusive lines
            lines.append((gates.summary, "green" if gates.status == "passed" else "yellow"))
        if saved is not None:
            lines.append((f"benchmark history: appended to {saved}", ""))
        return lines

    def to_markdown(self) -> str:
        name = self.model.get("name", "model")
        lines = [
            f"### pytest-slmdeploy: {name} {self.headline}",
            "",
            "| | checklist item | tests | key figures |",
            "|---|---|---|---|",
        ]
        icons = {"pass": "✅", "FAIL": "❌", "skipped": "⏭️"}
        for status, title, counts, figures in self.table_rows():
            lines.append(f"| {icons[status]} | {title} | {counts} | {figures or '-'} |")
        skipped = self.not_checked()
        if skipped:
            lines += ["", "Not checked (skipped, not passed):", ""]
            lines += [f"- {line}" for line in skipped]
        undecided = self.inconclusive_lines()
        if undecided:
            lines += ["", "Verdicts this run's evidence could not decide (timing, memory; not failures):", ""]
            lines += [f"- {line}" for line in undecided]
        if self.gates is not None:
            lines += ["", *self.gates.to_markdown()]
        if self.ladder_table:
            lines += ["", "Precision ladder (--slm-precision auto):", "", *self.ladder_table]
        if self.notes:
            lines += ["", "Notes:", "", *[f"- {note}" for note in self.notes]]
        details = ", ".join(f"{k}: {v}" for k, v in self.model.items() if k != "name")
        if details:
            lines += ["", details]
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


@dataclass(frozen=True)
class Installed:
    """What the summary says of the installed model."""

    name: str
    precision: str
    how: str  # built ..., reused ..., waited ...
    entry_dir: str
    model_bytes: int
    size_ratio: float
    source_bytes: int
    notes: tuple[str, ...] = ()
    ladder: tuple[str, ...] = ()  # the precision ladder's table
    foundry: str | None = None  # "registered as <id> (foundry-local-sdk <version>)"

    def lines(self) -> list[Line]:
        lines: list[Line] = [
            (f"{self.name} [{self.precision}]: {self.how}", ""),
            (f"  installed at {self.entry_dir}", ""),
            (
                f"  size {self.model_bytes / 1e6:.1f} MB = {self.size_ratio:.2f} x source "
                f"({self.source_bytes / 1e6:.1f} MB)",
                "",
            ),
        ]
        lines += [(f"  note: {note}", "yellow") for note in self.notes]
        if self.ladder:
            lines += [("  precision ladder:", ""), *[(f"    {line}", "") for line in self.ladder]]
        if self.foundry is not None:
            lines.append((f"  Foundry Local: {self.foundry}", ""))
        return lines


def write_runs_markdown(reports: Sequence[RunReport]) -> str:
    """The step summary of a run of several models: one row per model and family, then each model's section."""
    failed = [r.model.get("name", "model") for r in reports if not r.ok]
    verdict = f"{len(failed)} of {len(reports)} FAILED ({', '.join(failed)})" if failed else "all passed"
    families = [f for f in FAMILIES if any(f in r.families for r in reports)]
    icons = {"pass": "✅", "FAIL": "❌", "skipped": "⏭️"}
    lines = [
        f"## pytest-slmdeploy: {len(reports)} model{'s' if len(reports) != 1 else ''}, {verdict}",
        "",
        "| model | precision | " + " | ".join(FAMILIES[f] for f in families) + " |",
        "|---|---|" + "---|" * len(families),
    ]
    for r in reports:
        cells = [icons[r.families[f].status] if f in r.families else "-" for f in families]
        lines.append(f"| {r.model.get('name', 'model')} | {r.model.get('precision', '')} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n\n" + "\n".join(r.to_markdown() for r in reports)


def reports_in(document: dict[str, Any]) -> list[RunReport]:
    """The reports in a ``--slm-report`` file: one model's, or ``{"models": [...]}`` of a run of several."""
    if "models" in document:
        return [RunReport.from_json(model) for model in document["models"]]
    return [RunReport.from_json(document)]
