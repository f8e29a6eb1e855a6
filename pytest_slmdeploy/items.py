"""pytest nodes for case files: one test item per case, with a failure that shows prompt, output and misses."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the plugin imports this module in every pytest run: the case parser loads on first use
    from pytest_slmdeploy.checklist.cases import Case, CaseResult

DEFAULT_CASE_PATTERNS = ("slm_cases*.yaml", "slm_cases*.yml", "slm_cases*.toml")
MODEL_CASE_FILES = ("slm_cases.yaml", "slm_cases.yml", "slm_cases.toml")


def is_case_file(path: Path, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns)


class CaseFailure(Exception):
    def __init__(self, result: CaseResult) -> None:
        super().__init__(result.explain())
        self.result = result


class CaseFile(pytest.File):
    """A YAML/TOML file of domain cases; in a run of several models, each case once per model of ``models``."""

    def __init__(self, *, models: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.models = models

    def collect(self) -> Iterator[CaseItem]:
        from pytest_slmdeploy.checklist.cases import CaseFileError, load_case_file

        try:
            cases = load_case_file(self.path)
        except CaseFileError as exc:
            raise self.CollectError(f"slmdeploy: {exc}") from None
        for case in cases:
            if not self.models:
                yield CaseItem.from_parent(self, name=case.id, case=case)
            for model in self.models:  # the id as pytest's parametrization writes it: "-k NAME" selects the model
                yield CaseItem.from_parent(self, name=f"{case.id}[{model}]", case=case, model=model)


class CaseItem(pytest.Item):
    """One case: generate greedily, check the expectations."""

    def __init__(self, *, case: Case, model: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.model = model  # the model it checks, in a run of several
        self.add_marker("slm_domain")

    def runtest(self) -> None:
        from pytest_slmdeploy.checklist.cases import check_case
        from pytest_slmdeploy.stash import slm_session

        model = slm_session(self.config).model()
        generation = model.answer(list(self.case.messages), max_new_tokens=self.case.max_tokens)
        result = check_case(self.case, generation)
        if not result.passed:
            raise CaseFailure(result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CaseFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"case {self.case.id}" + (f" [{self.model}]" if self.model else "")


def model_case_files(model_dir: Path) -> list[Path]:
    """Cases shipped in the model folder itself (the fine-tuning team's own evaluation set)."""
    return [model_dir / name for name in MODEL_CASE_FILES if (model_dir / name).is_file()]
