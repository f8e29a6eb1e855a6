"""The built-in suite follows pytest's selection, its node ids pass back, and --co builds nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_slmdeploy.testing.tinymodel import FAQ

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

USER_TESTS = """
def test_a():
    pass

def test_b():
    pass
"""
LENGTHS = "slmdeploy::test_every_length_works_and_scales"
FIRST_CASE = "slmdeploy-model/slm_cases.yaml::" + FAQ[0][0].rstrip("?.").lower().replace(" ", "-")


def _model_args(model: Path, cache: Path) -> tuple[str, str]:
    # With "--slm-model PATH" pytest takes PATH for a test path while it looks for the rootdir and ini file
    # (before plugins add their options), and misses this project's ini file when PATH lies outside it.
    return f"--slm-model={model}", f"--slm-cache={cache}"


def _collected(result: pytest.RunResult) -> list[str]:
    """The node ids `--co -q` printed."""
    return [line for line in result.stdout.lines if "::" in line and " " not in line]


def _suite(ids: list[str]) -> list[str]:
    return [i for i in ids if i.startswith(("slmdeploy::", "slmdeploy-model/"))]


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project with testpaths = tests and two tests of its own."""
    pytester.makeini("[pytest]\ntestpaths = tests\n")
    pytester.mkdir("tests")
    (pytester.path / "tests" / "test_a.py").write_text(USER_TESTS)
    return pytester


@pytest.mark.parametrize(
    ("args", "suite_runs"),
    [
        ((), True),
        (("tests",), True),  # the testpaths themselves
        ((".",), True),  # the rootdir
        (("tests/test_a.py",), False),
        (("tests/test_a.py::test_a",), False),
    ],
    ids=["no-args", "testpaths", "rootdir", "a-file", "a-test"],
)
def test_a_test_path_narrows_the_run_to_the_users_tests(
    project: pytest.Pytester, tiny_model: Path, warm_cache: Path, args: tuple[str, ...], suite_runs: bool
) -> None:
    result = project.runpytest(*_model_args(tiny_model, warm_cache), "--co", "-q", *args)
    ids = _collected(result)
    assert "tests/test_a.py::test_a" in ids
    suite = _suite(ids)
    if suite_runs:
        assert LENGTHS in suite
        assert FIRST_CASE in suite
        assert len([i for i in suite if i.startswith("slmdeploy-model/")]) == len(FAQ)
    else:
        assert suite == []


def test_k_and_m_select_within_the_suite(project: pytest.Pytester, tiny_model: Path, warm_cache: Path) -> None:
    args = (*_model_args(tiny_model, warm_cache), "--co", "-q")
    assert _collected(project.runpytest(*args, "-k", "every_length")) == [LENGTHS]
    by_marker = _collected(project.runpytest(*args, "-m", "slm_domain"))
    assert by_marker == [i for i in by_marker if i.startswith("slmdeploy-model/")]
    assert len(by_marker) == len(FAQ)


def test_printed_node_ids_pass_back_and_run_exactly_that_item(
    project: pytest.Pytester, tiny_model: Path, warm_cache: Path
) -> None:
    args = _model_args(tiny_model, warm_cache)
    listed = _collected(project.runpytest(*args, "--co", "-q"))
    assert LENGTHS in listed
    assert FIRST_CASE in listed
    benchmarks = [i for i in listed if i.startswith("slmdeploy::test_benchmark_generation[")]
    assert len(benchmarks) == 3

    assert _collected(project.runpytest(*args, "--co", "-q", LENGTHS)) == [LENGTHS]
    assert _collected(project.runpytest(*args, "--co", "-q", benchmarks[0])) == benchmarks[:1]
    # Without its parametrization a node id selects every parametrization, as pytest's own do.
    assert _collected(project.runpytest(*args, "--co", "-q", "slmdeploy::test_benchmark_generation")) == benchmarks
    together = _collected(project.runpytest(*args, "--co", "-q", "tests/test_a.py::test_b", FIRST_CASE))
    assert sorted(together) == sorted(["tests/test_a.py::test_b", FIRST_CASE])

    result = project.runpytest_subprocess(*args, "-v", FIRST_CASE, "slmdeploy::test_model_loads_and_answers")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 2
    assert outcomes["deselected"] == len(_suite(listed)) - 2  # the rest of the suite, found to pick the two
    assert set(outcomes) == {"passed", "deselected"}
    result.stdout.fnmatch_lines_random([f"{FIRST_CASE} PASSED*", "slmdeploy::test_model_loads_and_answers PASSED*"])


def test_a_whole_built_in_file_or_the_suite_by_name(
    project: pytest.Pytester, tiny_model: Path, warm_cache: Path
) -> None:
    args = (*_model_args(tiny_model, warm_cache), "--co", "-q")
    cases = _collected(project.runpytest(*args, "slmdeploy-model/slm_cases.yaml"))
    assert len(cases) == len(FAQ)
    assert all(i.startswith("slmdeploy-model/slm_cases.yaml::") for i in cases)
    suite = _collected(project.runpytest(*args, "slmdeploy"))
    assert LENGTHS in suite
    assert not [i for i in suite if not i.startswith("slmdeploy::")]


def test_the_gate_items_id_passes_back_when_a_baseline_is_given(
    project: pytest.Pytester, tiny_model: Path, warm_cache: Path, tmp_path: Path
) -> None:
    args = (*_model_args(tiny_model, warm_cache), "--co", "-q", "slmdeploy::benchmark_gates")
    gated = project.runpytest(*args, f"--slm-bench-history={tmp_path}", "--slm-bench-baseline=last")
    assert _collected(gated) == ["slmdeploy::benchmark_gates"]
    ungated = project.runpytest(*args)
    assert ungated.ret == pytest.ExitCode.USAGE_ERROR
    ungated.stderr.fnmatch_lines(["*slmdeploy: not found: slmdeploy::benchmark_gates *"])


def test_an_unknown_built_in_id_is_a_usage_error(project: pytest.Pytester, tiny_model: Path, warm_cache: Path) -> None:
    result = project.runpytest(*_model_args(tiny_model, warm_cache), "slmdeploy::test_nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*slmdeploy: not found: slmdeploy::test_nope (the built-in items: *"])


def test_a_built_in_id_without_a_model_says_what_is_missing(project: pytest.Pytester) -> None:
    result = project.runpytest(LENGTHS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*slmdeploy: {LENGTHS} is in the built-in suite: add --slm-model PATH*"])


def test_a_real_folder_named_slmdeploy_is_a_path(project: pytest.Pytester, tiny_model: Path, warm_cache: Path) -> None:
    project.mkdir("slmdeploy")
    (project.path / "slmdeploy" / "test_mine.py").write_text("def test_mine():\n    pass\n")
    result = project.runpytest(*_model_args(tiny_model, warm_cache), "--co", "-q", "slmdeploy")
    assert _collected(result) == ["slmdeploy/test_mine.py::test_mine"]


MODULES_PROBE = """
import json, sys
def pytest_sessionfinish(session):
    with open("imported.json", "w") as fh:
        json.dump(sorted(m for m in ("olive", "onnxruntime_genai", "torch") if m in sys.modules), fh)
"""


def test_collect_only_builds_nothing_and_prints_no_summary(
    project: pytest.Pytester, tiny_model: Path, tmp_path: Path
) -> None:
    project.makeconftest(MODULES_PROBE)
    cache = tmp_path / "empty-cache"
    result = project.runpytest_subprocess(*_model_args(tiny_model, cache), "--co", "-q")
    assert result.ret == pytest.ExitCode.OK
    assert LENGTHS in _collected(result)
    assert "= slmdeploy =" not in result.stdout.str()
    assert "converting" not in result.stdout.str()
    assert not (cache / "custom" / "faq-int4").exists()
    assert json.loads((project.path / "imported.json").read_text()) == [], "the build or runtime was imported"


def test_xdist_workers_run_the_named_items(project: pytest.Pytester, tiny_model: Path, warm_cache: Path) -> None:
    args = ("-n", "2", *_model_args(tiny_model, warm_cache))
    project.runpytest_subprocess(*args, "slmdeploy-model/slm_cases.yaml").assert_outcomes(passed=len(FAQ))
    # A worker's usage error would never reach the controller: the run would end in "no tests ran".
    unknown = project.runpytest_subprocess(*args, "slmdeploy::test_nope")
    assert unknown.ret == pytest.ExitCode.TESTS_FAILED
    unknown.stdout.fnmatch_lines(["ERROR slmdeploy - slmdeploy: not found: slmdeploy::test_nope *"])
