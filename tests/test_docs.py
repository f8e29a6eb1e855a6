"""The docs cannot rot: every option is documented, and the examples parse and run."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from pytest_slmdeploy.checklist.cases import parse_cases
from pytest_slmdeploy.plugin import _OPTIONS
from pytest_slmdeploy.settings import LIMITS

DOCS = Path(__file__).parents[1] / "docs"
README = Path(__file__).parents[1] / "README.md"


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def test_every_option_and_ini_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for flag, key, *_ in _OPTIONS:
        assert f"`{flag}" in text, flag
        assert f"`{key}`" in text, key
    limits = (DOCS / "checklist.md").read_text()
    for key in LIMITS:
        assert f"`slm_{key}`" in limits, key


@pytest.mark.parametrize("path", [*sorted(DOCS.glob("*.md")), README], ids=lambda p: p.name)
def test_python_examples_are_valid_python(path: Path) -> None:
    for block in _blocks(path, "python"):
        ast.parse(block)


def test_case_file_examples_are_valid_case_files() -> None:
    import tomllib

    page = DOCS / "checklist.md"
    yaml_cases = [c for block in _blocks(page, "yaml") for c in parse_cases(yaml.safe_load(block), "docs")]
    toml_cases = [c for block in _blocks(page, "toml") for c in parse_cases(tomllib.loads(block), "docs")]
    assert len(yaml_cases) >= 3
    assert len(toml_cases) >= 1


def test_ini_examples_are_valid_settings(pytester: pytest.Pytester) -> None:
    """The pyproject examples in the docs configure the plugin without an error."""
    pytester.makepyfile("def test_settings(slm_settings):\n    assert slm_settings.precision\n")
    checked = 0
    for page in [README, DOCS / "index.md", DOCS / "configuration.md"]:
        for block in _blocks(page, "toml"):
            if "[tool.pytest.ini_options]" not in block:
                continue
            # Everything but the model (building one is other tests' job): the values must validate.
            if "slm_models = [" in block:  # a table of models: its entries must resolve, the folders aside
                import tomllib

                from pytest_slmdeploy.settings import resolve_models

                values = tomllib.loads(block)["tool"]["pytest"]["ini_options"]
                assert len(resolve_models(values.get, ini_dir=pytester.path)) == len(values["slm_models"])
                block = re.sub(r"slm_models = \[.*?\n\]\n", "", block, flags=re.S)
            pytester.makepyprojecttoml(re.sub(r'slm_model = "[^"]*"', 'slm_model = ""', block))
            result = pytester.runpytest("-p", "no:cacheprovider")
            assert result.ret == 0, (page.name, result.stderr.str())
            checked += 1
    assert checked >= 3


def test_test_examples_pass_against_a_real_model(pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path) -> None:
    """Every documented test function runs green on the tiny FAQ model (the docs use its domain)."""
    examples = [
        block
        for page in [README, *sorted(DOCS.glob("*.md"))]
        for block in _blocks(page, "python")
        if "def test_" in block
    ]
    assert len(examples) >= 4
    for i, block in enumerate(examples):
        pytester.makepyfile(**{f"test_doc_example_{i}": block})
    result = pytester.runpytest_subprocess(
        "--slm-model", str(tiny_model), "--slm-cache", str(warm_cache), "--slm-no-suite", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=len(examples))


def test_the_limits_table_shows_the_defaults() -> None:
    text = (DOCS / "checklist.md").read_text()
    for key, (default, _) in LIMITS.items():
        assert f"| `slm_{key}` | `{default:g}` |" in text, key


def test_the_readme_output_has_the_codes_labels() -> None:
    """The README's sample output (pasted from a run of scripts/example.sh) names every checklist row as the
    report does, in its order, and the benchmark table's header as bench_table writes it (issue 21, item 11:
    it had lost row 6 and kept old memory and edge labels)."""
    from pytest_slmdeploy import bench_table
    from pytest_slmdeploy.report import FAMILIES

    text = README.read_text()
    block = text[text.index("What the main job prints") :]
    block = block[block.index("```") + 3 : block.index("```", block.index("```") + 3)]
    rows = [line[8:].split("  ")[0].strip() for line in block.splitlines() if line.startswith(("pass    ", "FAIL    "))]
    models = [line for line in block.splitlines() if line.startswith("-- ")] or [""]  # a section per model
    assert rows == list(FAMILIES.values()) * len(models)
    header = (
        ("  model" + " " * 10 if models != [""] else "")  # several models: a first column names each row's
        + "  benchmark".ljust(2 + bench_table.NAME_WIDTH)
        + "  "
        + "  ".join(name.rjust(width) for name, width in bench_table.COLUMNS)
    )
    assert bench_table.TITLE in block
    assert any(line.split() == header.split() for line in block.splitlines()), header
