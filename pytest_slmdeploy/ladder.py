"""The precision ladder: the tutorial's "start with INT4; if the quality is not good enough, move to INT8, then FP16".

The rungs are recipes (:mod:`pytest_slmdeploy.recipes`), cheapest first. Each is built (and cached) like any
build, then judged against the source model: the fidelity family (teacher-forced top-1 agreement and KL
divergence, :mod:`pytest_slmdeploy.fidelity`) and the domain cases. The ladder stops at the first rung that
passes: the smallest faithful build. ``fp16`` is not a rung on the CPU execution provider, which has no fp16
kernels (``fp32`` takes its place as the most faithful rung).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_slmdeploy import measure
from pytest_slmdeploy.checklist.cases import Case
from pytest_slmdeploy.deploy import Deployment, Plan, deploy, prepare
from pytest_slmdeploy.errors import SlmDeployError, describe
from pytest_slmdeploy.fidelity import FidelityLimits, FidelityResult, References
from pytest_slmdeploy.recipes import LADDER, RECIPES
from pytest_slmdeploy.settings import Settings, default_model_name

RUNGS = LADDER  # CPUExecutionProvider: fp16 is refused, fp32 is the faithful end
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Rung:
    """One recipe tried: its build, how faithful it is, its domain cases, and (when measured) its speed."""

    precision: str  # the recipe's name (what --slm-precision takes)
    name: str
    passed: bool
    reasons: tuple[str, ...] = ()  # why it was rejected (empty when it passed)
    model_mb: float = 0.0
    size_ratio: float = 0.0
    cache_hit: bool = False
    build_s: float = 0.0
    answers_identical: int = 0
    answers_total: int = 0
    top1_agreement: float = 0.0
    mean_kld: float = 0.0
    max_kld: float = 0.0
    cases_passed: int = 0
    cases_total: int = 0
    decode_tps: float | None = None
    ttft_ms: float | None = None
    peak_rss_mb: float | None = None
    fidelity: FidelityResult | None = field(default=None, compare=False, repr=False)

    @property
    def recipe(self) -> str:
        """What the recipe does, in one line."""
        known = RECIPES.get(self.precision)
        return known.summary if known else self.precision

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "recipe": self.recipe,
            "passed": self.passed,
            "size_ratio": round(self.size_ratio, 4),
            "decode_tps": self.decode_tps,
            "ttft_ms": self.ttft_ms,
            "peak_rss_mb": self.peak_rss_mb,
            "answers_identical": self.answers_identical,
            "top1_agreement": round(self.top1_agreement, 4),
            "mean_kld": self.mean_kld,
            "name": self.name,
            "model_mb": self.model_mb,
            "answers_total": self.answers_total,
            "max_kld": self.max_kld,
            "cases_passed": self.cases_passed,
            "cases_total": self.cases_total,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class Ladder:
    """The rungs tried, in order, and the precision chosen (None: none passed)."""

    rungs: tuple[Rung, ...]
    chosen: str | None

    def to_json(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "rungs": [rung.to_json() for rung in self.rungs]}

    def table(self) -> list[str]:
        """The tutorial's table, measured on this model (Markdown)."""
        lines = [
            "| precision | recipe | size | x source | decode tok/s | TTFT ms | peak RSS MB | answers identical "
            "| top-1 | mean KLD | domain cases | passed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rungs:
            speed = [_or_dash(r.decode_tps, ".1f"), _or_dash(r.ttft_ms, ".1f"), _or_dash(r.peak_rss_mb, ".0f")]
            cases = f"{r.cases_passed}/{r.cases_total}" if r.cases_total else "-"
            mark = "yes" + (" (chosen)" if r.precision == self.chosen else "") if r.passed else "no"
            lines.append(
                f"| {r.precision} | {r.recipe} | {r.model_mb:.1f} MB | {r.size_ratio:.2f} | {' | '.join(speed)} "
                f"| {r.answers_identical}/{r.answers_total} | {r.top1_agreement:.1%} | {r.mean_kld:.3g} | {cases} "
                f"| {mark} |"
            )
        return lines

    def notes(self) -> list[str]:
        """One line per rejected rung and the choice, for the run's notes."""
        lines = [f"precision auto: {r.precision} rejected: {'; '.join(r.reasons)}" for r in self.rungs if not r.passed]
        if self.chosen is not None:
            lines.append(
                f"precision auto: chose {self.chosen}, the smallest build that passed ({' -> '.join(RUNGS)}, "
                "cheapest first)"
            )
        else:
            last = self.rungs[-1].precision if self.rungs else RUNGS[-1]
            lines.append(f"precision auto: no rung passed; the tests run on {last}, the most faithful one")
        return lines


def _or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def climb(evaluate: Callable[[str], Rung], rungs: Sequence[str] = RUNGS, *, every_rung: bool = False) -> Ladder:
    """Evaluate ``rungs`` in order and stop at the first that passes (with ``every_rung``, go on to the end)."""
    tried: list[Rung] = []
    chosen = None
    for precision in rungs:
        rung = evaluate(precision)
        tried.append(rung)
        if rung.passed and chosen is None:
            chosen = precision
            if not every_rung:
                break
    return Ladder(tuple(tried), chosen)


def rung_settings(settings: Settings, precision: str) -> Settings:
    """The settings of one rung: its precision, and a name of its own (``<name>-<precision>``)."""
    assert settings.model is not None
    name = f"{settings.name}-{precision}" if settings.name else default_model_name(settings.model, precision)
    return dataclasses.replace(settings, precision=precision, name=name)


@dataclass
class RungJudge:
    """Builds a rung and judges it: what :func:`climb` calls for each precision.

    ``references`` are the source's, computed once for all rungs; ``cases`` are the domain cases to pass.
    """

    settings: Settings
    references: Callable[[], References]
    limits: FidelityLimits
    cases: Sequence[Case] = ()
    measure_speed: bool = False
    adjust_recipe: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    progress: Progress = lambda message: None
    plans: dict[str, Plan] = field(default_factory=dict)
    deployments: dict[str, Deployment] = field(default_factory=dict)

    def __call__(self, precision: str) -> Rung:
        from pytest_slmdeploy import fidelity

        settings = rung_settings(self.settings, precision)
        plan = self.plans[precision] = prepare(settings, adjust_recipe=self.adjust_recipe)
        self.progress(f"precision ladder: {precision} ({plan.name})")
        deployment = self.deployments[precision] = deploy(plan, progress=self.progress)
        result = fidelity.score(
            deployment.entry_dir, self.references(), progress=self.progress, threads=self.settings.threads
        )
        # A rung ships only on a decided pass: one whose interval straddles a limit is not shown faithful.
        reasons = [phrase for _, phrase in self.limits.checks(result)]
        missed = self._cases(deployment)
        if missed:
            case_id, what = missed[0]
            reasons.append(
                f"{len(missed)}/{len(self.cases)} domain cases missed (first: {case_id!r}: {', '.join(what)})"
            )
        alone = measure.model_alone(deployment.entry_dir, threads=self.settings.threads) if self.measure_speed else {}
        speed = {key: alone[key] for key in ("decode_tps", "ttft_ms", "peak_rss_mb") if key in alone}
        manifest = deployment.manifest
        return Rung(
            precision=precision,
            name=deployment.name,
            passed=not reasons,
            reasons=tuple(reasons),
            model_mb=round(manifest.model_bytes / 1e6, 1),
            size_ratio=manifest.size_ratio,
            cache_hit=deployment.cache_hit,
            build_s=manifest.build_seconds,
            answers_identical=result.answers_identical,
            answers_total=result.total,
            top1_agreement=result.top1_agreement,
            mean_kld=float(f"{result.mean_kld:.4g}"),
            max_kld=float(f"{result.max_kld:.4g}"),
            cases_passed=len(self.cases) - len(missed),
            cases_total=len(self.cases),
            fidelity=result,
            **speed,
        )

    def _cases(self, deployment: Deployment) -> list[tuple[str, tuple[str, ...]]]:
        """The domain cases this rung misses: (case id, expectations missed)."""
        if not self.cases:
            return []
        from pytest_slmdeploy.checklist.cases import check_case
        from pytest_slmdeploy.runtime import open_model

        model = open_model("ort-genai", deployment.entry_dir, cache_root=self.settings.cache_dir,
                           model_name=deployment.name, threads=self.settings.threads)  # fmt: skip
        try:
            results = [
                check_case(case, model.generate(list(case.messages), max_new_tokens=case.max_tokens))
                for case in self.cases
            ]
        finally:
            model.close()
        return [(r.case.id, r.missed) for r in results if not r.passed]


def run_ladder(
    settings: Settings,
    *,
    prompts: Sequence[Any],
    limits: Mapping[str, float],
    cases: Sequence[Case] = (),
    measure_speed: bool = False,
    every_rung: bool = False,
    adjust_recipe: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    progress: Progress = lambda message: None,
) -> tuple[Ladder, RungJudge]:
    """Build and judge the rungs of ``settings.model``; the judge keeps each rung's plan and deployment."""
    from pytest_slmdeploy import fidelity

    assert settings.model is not None
    computed: list[References] = []

    def references() -> References:
        if not computed:
            try:
                computed.append(
                    fidelity.compute_references(
                        settings.model,  # type: ignore[arg-type]
                        prompts,
                        max_new_tokens=int(limits["fidelity_max_new_tokens"]),
                        cache_dir=settings.cache_dir,
                        trust_remote_code=settings.trust_remote_code,
                        progress=progress,
                    )
                )
            except SlmDeployError:
                raise
            except Exception as exc:  # pragma: no cover - a bug, reported in one line
                raise SlmDeployError(f"computing the references failed: {describe(exc)}") from None
        return computed[0]

    judge = RungJudge(
        settings,
        references,
        FidelityLimits.of(limits),
        cases=cases,
        measure_speed=measure_speed,
        adjust_recipe=adjust_recipe,
        progress=progress,
    )
    return climb(judge, every_rung=every_rung), judge
