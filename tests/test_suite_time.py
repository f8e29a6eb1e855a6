"""scripts/suite_time.py's arithmetic: JUnit times by family, token-equivalents, the report's round figures.

No model: a small JUnit XML file written here stands for a run of the built-in suite.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests">
  <testsuite name="pytest" errors="0" failures="1" skipped="1" tests="5" time="9.5">
    <testcase classname="slmdeploy" name="test_model_loads_and_answers" time="1.250">
      <properties><property name="slm_family" value="smoke"/><property name="slm:ttft_s" value="0.01"/></properties>
    </testcase>
    <testcase classname="slmdeploy" name="test_no_leak_over_many_generations" time="4.000">
      <properties><property name="slm_family" value="memory"/></properties>
      <failure message="leak">grew</failure>
    </testcase>
    <testcase classname="slmdeploy" name="test_no_leak_over_load_unload" time="0.500">
      <properties><property name="slm_family" value="memory"/></properties>
    </testcase>
    <testcase classname="slmdeploy" name="test_new_kind_of_check" time="2.000">
      <properties><property name="slm_family" value="zzz_new"/></properties>
    </testcase>
    <testcase classname="tests.test_mine" name="test_without_family" time="0.750">
      <skipped type="pytest.skip" message="no">no</skipped>
    </testcase>
  </testsuite>
</testsuites>
"""


@pytest.fixture
def suite_time(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module (its sibling imports need scripts/ on sys.path, as when it runs)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    return importlib.import_module("suite_time")


@pytest.fixture
def junit(tmp_path: Path) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    return path


def test_testcase_times_are_summed_by_family(suite_time: ModuleType, junit: Path) -> None:
    cases = suite_time.read_junit(junit)
    assert [c.family for c in cases] == ["smoke", "memory", "memory", "zzz_new", "other"]
    families = suite_time.family_seconds(cases, wall_s=10.0)
    # The checklist's order, then families the script does not know, "other", and the rest of the wall time.
    assert list(families) == ["smoke", "memory", "zzz_new", "other", "unaccounted"]
    assert families == {"smoke": 1.25, "memory": 4.5, "zzz_new": 2.0, "other": 0.75, "unaccounted": 1.5}
    assert sum(families.values()) == pytest.approx(10.0)
    assert suite_time.session_seconds(junit) == pytest.approx(9.5)


def test_outcomes_and_slowest_tests(suite_time: ModuleType, junit: Path) -> None:
    cases = suite_time.read_junit(junit)
    assert suite_time.outcomes(cases) == {"passed": 3, "failed": 1, "skipped": 1}
    assert suite_time.slowest(cases, 2) == [
        ("slmdeploy::test_no_leak_over_many_generations", 4.0),
        ("slmdeploy::test_new_kind_of_check", 2.0),
    ]
    assert len(suite_time.slowest(cases)) == 5  # at most ten


def test_token_equivalents_are_seconds_times_bare_decode_speed(suite_time: ModuleType) -> None:
    assert suite_time.token_equivalents(90.0, 40.0) == pytest.approx(3600.0)
    assert suite_time.token_equivalents(0.0, 40.0) == 0.0
    run = {
        "wall_s": 10.0, "session_s": 9.5, "bare_decode_tps": 100.0, "token_equivalents": 1000,
        "families": {"smoke": 2.5, "memory": 7.0, "unaccounted": 0.5}, "slowest": [["slmdeploy::test_x", 7.0]],
        "round_figures": {"lengths": {"timing rounds": 5}},
    }  # fmt: skip
    lines = suite_time.table(run)
    assert lines[1].split() == ["smoke", "2.50", "25.0%", "250"]
    assert lines[2].split() == ["memory", "7.00", "70.0%", "700"]
    assert lines[4].split() == ["total", "10.00", "100.0%", "1,000"]
    assert "0.50s outside pytest's session" in lines[5]
    assert "0.00s in it between tests" in lines[5]
    assert "    lengths: timing rounds = 5" in lines


def test_round_figures_and_the_installed_folder(suite_time: ModuleType, tmp_path: Path) -> None:
    report = {
        "model": {"name": "faq-int4"},
        "families": [
            {"family": "lengths", "figures": {"TTFT ms by length": "13:0.6", "timing rounds": 5}},
            {"family": "benchmark", "figures": {"Rounds @128": 10, "decode tok/s @128": 9000}},
            {"family": "smoke", "figures": {"ttft_s": 0.001}},
        ],
    }
    assert suite_time.round_figures(report) == {"lengths": {"timing rounds": 5}, "benchmark": {"Rounds @128": 10}}
    entry = tmp_path / "custom" / "faq-int4"
    entry.mkdir(parents=True)
    (entry / "genai_config.json").write_text("{}")
    (tmp_path / "custom" / "half-built").mkdir()  # no genai_config.json: not a candidate
    assert suite_time.installed_folder(tmp_path, report) == entry
    assert suite_time.installed_folder(tmp_path, {}) == entry  # the only entry with a genai_config.json


def test_pytest_arguments_follow_the_double_dash(suite_time: ModuleType) -> None:
    own, extra = suite_time.split_extra(["m", "--runs", "2", "--", "-k", "memory"])
    assert (own, extra) == (["m", "--runs", "2"], ["-k", "memory"])
    assert suite_time.split_extra(["--runs", "2"]) == (["--runs", "2"], [])
