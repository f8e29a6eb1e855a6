"""Several models in one run (issue 22): one build and one loaded model at a time each, a row set per model in
every report, history and gates per model, xdist groups by model, and one clear line for a bad model table."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_slmdeploy.errors import SettingsError
from pytest_slmdeploy.run import model_in_nodeid
from pytest_slmdeploy.settings import resolve_models
from pytest_slmdeploy.testing.tinymodel import FAQ

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NAMES = ("faq-int4", "faq-int8")
# Written by the project's conftest at every test's setup: which models have a loaded runtime right then.
LOADED_PROBE = """
import json
from pytest_slmdeploy.stash import RUN_KEY

class Probe:  # a plugin, not a conftest hook: the suite's items live outside this folder
    def pytest_runtest_setup(self, item):
        run = item.config.stash.get(RUN_KEY, None)
        if run is not None:
            loaded = [name for name, s in run.sessions.items() if s._model is not None or s._foundry is not None]
            with open("loaded.jsonl", "a") as fh:
                fh.write(json.dumps([item.nodeid, loaded]) + "\\n")

def pytest_configure(config):
    config.pluginmanager.register(Probe())
"""


def _table(model: Path, cache: Path, extra: str = "") -> str:
    return (
        "[tool.pytest.ini_options]\n"
        f'slm_cache = "{cache}"\n'
        'slm_report = "report.json"\n'
        'slm_bench_history = "history"\n'
        "slm_models = [\n"
        f'  {{name = "faq-int4", path = "{model}", precision = "int4"}},\n'
        f'  {{name = "faq-int8", path = "{model}", precision = "int8"{extra}}},\n'
        "]\n"
    )


@pytest.fixture
def two_models(pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path) -> pytest.Pytester:
    pytester.makepyprojecttoml(_table(tiny_model, tmp_path / "cache"))
    pytester.makeconftest(LOADED_PROBE)
    return pytester


def _model_of(nodeid: str) -> str | None:
    return model_in_nodeid(nodeid, NAMES)


def test_two_models_run_one_after_the_other_with_a_row_set_each(two_models: pytest.Pytester, tmp_path: Path) -> None:
    result = two_models.runpytest_subprocess("-p", "no:cacheprovider", "--slm-bench-save", "-rs")
    result.assert_outcomes(passed=54, skipped=2)  # 27 tests and the 512-token benchmark's skip, per model
    output = result.stdout.str()
    # Each built once (the progress lines), each with its own recipe.
    assert output.count("slmdeploy: installed ") == 2
    assert re.findall(r"installed \S+/custom/(faq-int[48]) ", output) == list(NAMES)
    result.stdout.fnmatch_lines(
        [
            "slmdeploy: 2 models: faq-int4, faq-int8",
            "*= slmdeploy =*",
            "-- faq-int4: passed, 1 not checked --",
            "pass *6. Faithful to the fine-tuned source*",
            "faq-int4 [[]int4[]]: built in *",
            "-- faq-int8: passed, 1 not checked --",
            "faq-int8 [[]int8[]]: built in *",
            "benchmarks (medians*",
            "  model     benchmark  *",
            "  faq-int4  test_benchmark_generation[[]128[]]  *",
            "  faq-int8  test_benchmark_generation[[]128[]]  *",
        ]
    )
    # One model loaded at a time: the first model's runtime is closed before the second's first test.
    probes = [json.loads(line) for line in (two_models.path / "loaded.jsonl").read_text().splitlines()]
    assert all(len(loaded) <= 1 for _, loaded in probes), probes
    order = [_model_of(nodeid) for nodeid, _ in probes]
    assert order == sorted(order, key=lambda name: NAMES.index(name or NAMES[0])), order  # grouped by model
    assert {name for _, loaded in probes for name in loaded} == set(NAMES)
    report = json.loads((two_models.path / "report.json").read_text())
    assert report["ok"] is True
    assert [m["model"]["name"] for m in report["models"]] == list(NAMES)
    assert [m["model"]["precision"] for m in report["models"]] == ["int4", "int8"]
    for model in report["models"]:
        passed = {f["family"]: f["passed"] for f in model["families"]}
        assert passed["fidelity"] == 1, passed
        assert passed["domain"] == len(FAQ), passed  # the model folder's own cases, checked on each model
    for name in NAMES:  # history per model name
        (record,) = [
            json.loads(line) for line in (two_models.path / "history" / f"{name}.jsonl").read_text().splitlines()
        ]
        assert record["model"] == name


def test_k_selects_one_model_and_builds_only_it(two_models: pytest.Pytester, tmp_path: Path) -> None:
    selected = "faq-int8 and test_installed_in_foundry_local_cache"
    result = two_models.runpytest_subprocess("-p", "no:cacheprovider", "-k", selected)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 passed, 55 deselected*"])
    assert sorted(p.name for p in (tmp_path / "cache" / "custom").iterdir()) == ["faq-int8"]


def test_under_xdist_each_model_runs_on_one_worker(two_models: pytest.Pytester) -> None:
    selected = "slm_smoke or slm_domain or slm_fidelity"  # the quick families: where each test runs is the point
    result = two_models.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-v", "-m", selected)
    result.assert_outcomes(passed=2 * (3 + len(FAQ) + 1))  # no --dist given: the plugin asked for loadgroup
    workers: dict[str, set[str]] = {}
    for line in result.stdout.lines:
        found = re.match(r"\[(gw\d)\] .*(?:PASSED|SKIPPED) (\S+)", line)
        if found and _model_of(found.group(2)):
            workers.setdefault(str(_model_of(found.group(2))), set()).add(found.group(1))
    assert set(workers) == set(NAMES)
    assert all(len(ids) == 1 for ids in workers.values()), workers
    report = json.loads((two_models.path / "report.json").read_text())
    assert [m["model"]["name"] for m in report["models"]] == list(NAMES)
    assert all(m["ok"] and m["families"] for m in report["models"])


def test_a_regression_in_one_model_fails_only_its_gate(
    two_models: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # else pytest-benchmark disables itself in the run
    args = ("-p", "no:cacheprovider", "-m", "slm_benchmark", "--slm-bench-gate", "peak_rss_mb:+25%")
    two_models.runpytest_subprocess(*args, "--slm-bench-save").assert_outcomes(passed=4, skipped=2)
    history = two_models.path / "history" / "faq-int8.jsonl"
    record = json.loads(history.read_text())
    # A baseline that used half the memory: today's int8 reads as a 100% regression, the int4 baseline is its own.
    record["metrics"]["peak_rss_mb"] /= 2
    history.write_text(json.dumps(record) + "\n")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    gated = two_models.runpytest_subprocess(*args, "--slm-bench-baseline", "last", "-v", "--junitxml", "junit.xml")
    assert gated.ret == pytest.ExitCode.TESTS_FAILED
    gated.assert_outcomes(passed=5, skipped=2, failed=1)
    gated.stdout.fnmatch_lines(
        ["*slmdeploy::benchmark_gates[[]faq-int4[]] PASSED*", "*slmdeploy::benchmark_gates[[]faq-int8[]] FAILED*"]
    )
    gated.stdout.fnmatch_lines(["benchmark gate FAILED: faq-int8: peak_rss_mb grew * (limit +25%)*"])
    markdown = summary.read_text()
    assert "## pytest-slmdeploy: 2 models, 1 of 2 FAILED (faq-int8)" in markdown
    assert "### pytest-slmdeploy: faq-int4 passed" in markdown
    assert "### pytest-slmdeploy: faq-int8 FAILED" in markdown
    junit = (two_models.path / "junit.xml").read_text()
    assert 'name="benchmark_gates[faq-int8]"' in junit
    assert '<property name="slm_model" value="faq-int8" />' in junit


# -- bad input: one line naming the entry ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[{name = "a", path = "m"}, {name = "a", path = "m", precision = "int8"}]',
            "slm_models entry 2 (a) and slm_models entry 1 (a) are both named 'a'*",
        ),
        ('[{name = "a", path = "m", precison = "int8"}]', "slm_models entry 1 (a): unknown key 'precison' (known: *"),
        ('[{name = "a"}]', "slm_models entry 1 (a): no path*"),
        (
            '[{name = "a", path = "m"}, {name = "b", path = "m", limits = {stop_rate = 1}}]',
            "slm_models entry 2 (b): unknown limit 'stop_rate'*",
        ),
        ('[{name = "a", path = "m", precision = "int3"}]', "slm_models entry 1 (a): precision = 'int3' is not one of*"),
    ],
    ids=["same-name", "unknown-key", "no-path", "unknown-limit", "bad-precision"],
)
def test_a_bad_model_table_gets_one_line_naming_the_entry(
    pytester: pytest.Pytester, tiny_model: Path, table: str, message: str
) -> None:
    (pytester.path / "m").symlink_to(tiny_model)
    pytester.makepyprojecttoml(f"[tool.pytest.ini_options]\nslm_models = {table}\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: slmdeploy: {message}"])
    assert len([line for line in result.stderr.lines if line.strip()]) == 1, result.stderr.lines


def test_a_missing_model_among_several_is_named(pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path) -> None:
    result = pytester.runpytest(
        f"--slm-model={tiny_model}", f"--slm-model={tmp_path / 'gone'}", f"--slm-cache={tmp_path / 'cache'}"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: slmdeploy: model gone-int4 (*/gone): model folder */gone does not exist*"])
    assert len([line for line in result.stderr.lines if line.strip()]) == 1, result.stderr.lines
    assert not list(tmp_path.glob("cache/custom/*"))  # nothing built for the good one either


def test_one_slm_model_runs_the_tables_entries_for_that_folder() -> None:
    entries = [
        {"name": "a4", "path": "m"},
        {"name": "a8", "path": "m", "precision": "int8"},
        {"name": "b", "path": "n"},
    ]
    a4, a8 = _models({"slm_models": entries}, cli=["/proj/m"])
    assert (a4.model_name, a8.model_name, a8.precision) == ("a4", "a8", "int8")  # type: ignore[attr-defined]
    (alone,) = _models({"slm_models": entries, "slm_precision": "fp32"}, cli=["/elsewhere/x"])
    assert (alone.model, alone.model_name) == (Path("/elsewhere/x"), "x-fp32")  # type: ignore[attr-defined]


def test_repeated_slm_model_and_a_table_do_not_mix(pytester: pytest.Pytester, tiny_model: Path) -> None:
    pytester.makepyprojecttoml(f'[tool.pytest.ini_options]\nslm_models = [{{name = "a", path = "{tiny_model}"}}]\n')
    result = pytester.runpytest(f"--slm-model={tiny_model}", f"--slm-model={tiny_model}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: slmdeploy: --slm-model */faq --slm-model */faq and the slm_models table (1 entry) both name *"]
    )


# -- settings, without pytest -------------------------------------------------------------------------------
def _models(values: dict[str, object], cli: list[str] | None = None, only: list[str] | None = None) -> list[Any]:
    return resolve_models(values.get, ini_dir=Path("/proj"), cli_models=cli, only=only, env={"XDG_CACHE_HOME": "/x"})


def test_one_model_resolves_as_before() -> None:
    (settings,) = _models({"slm_model": "m", "slm_name": "n"})
    assert (settings.model, settings.model_name, settings.case_files) == (Path("/proj/m"), "n", ())  # type: ignore[attr-defined]


def test_a_repeated_slm_model_makes_one_settings_each() -> None:
    first, second = _models({"slm_precision": "int8"}, cli=["/a/faq", "/b/shop"])
    assert (first.model_name, second.model_name) == ("faq-int8", "shop-int8")  # type: ignore[attr-defined]


def test_an_ini_file_table_reads_key_value_lines() -> None:
    table = "name=faq path=models/faq precision=auto cases=faq.yaml,more.yaml\nname=shop path=/abs/shop"
    faq, shop = _models({"slm_models": table, "slm_fidelity_max_mean_kld": "0.05"})
    assert (faq.precision, faq.model, shop.model) == ("auto", Path("/proj/models/faq"), Path("/abs/shop"))  # type: ignore[attr-defined]
    assert faq.case_files == (Path("/proj/faq.yaml"), Path("/proj/more.yaml"))  # type: ignore[attr-defined]
    assert faq.limits["fidelity_max_mean_kld"] == 0.05  # type: ignore[attr-defined]


def test_a_table_entry_overrides_limits_for_its_model_only() -> None:
    entries = [{"name": "a", "path": "a", "limits": {"slm_fidelity_max_mean_kld": 0.02}}, {"name": "b", "path": "b"}]
    a, b = _models({"slm_models": entries})
    assert (a.limits["fidelity_max_mean_kld"], b.limits["fidelity_max_mean_kld"]) == (0.02, 0.1)  # type: ignore[attr-defined]


def test_named_models_on_the_command_line_and_only() -> None:
    v1, v2 = _models({}, cli=["faq-v1=/runs/a/model", "faq-v2=/runs/b/model"])
    assert (v1.model_name, v1.model, v2.model_name) == ("faq-v1", Path("/runs/a/model"), "faq-v2")  # type: ignore[attr-defined]
    (only,) = _models({}, cli=["faq-v1=/runs/a/model", "faq-v2=/runs/b/model"], only=["faq-v2"])
    assert only.model == Path("/runs/b/model")  # type: ignore[attr-defined]
    (unnamed,) = _models({"slm_models": [{"path": "a"}, {"path": "b"}]}, only=["b-int4"])  # the default name
    assert unnamed.model == Path("/proj/b")  # type: ignore[attr-defined]


def test_model_in_nodeid() -> None:
    names = ["faq-int4", "faq"]  # longest first
    assert model_in_nodeid("slmdeploy::test_x[faq-int4-16]", names) == "faq-int4"
    assert model_in_nodeid("slmdeploy::test_x[16-faq]", names) == "faq"
    assert model_in_nodeid("slmdeploy::test_x[faq-int4-ort-genai]@faq-int4", names) == "faq-int4"
    assert model_in_nodeid("tests/v1@rc/test_a.py::test_y[faq]", names) == "faq"  # an "@" in a folder name
    assert model_in_nodeid("tests/test_a.py::test_z", names) is None


@pytest.mark.parametrize(
    ("values", "cli", "message"),
    [
        ({"slm_name": "x"}, ["/a", "/b"], "slm_name names one model*"),
        ({"slm_models": [{"path": "a"}], "slm_model": "b"}, None, "slm_model and slm_models are both set*"),
        ({}, ["/a/m", "/b/m"], "--slm-model /b/m and --slm-model /a/m are both named 'm-int4'*"),
        ({"slm_models": ["name=a path"]}, None, "slm_models entry 1 (name=a path): 'path' is not key=value"),
        (
            {"slm_models": [{"name": "f", "path": "m", "precision": "auto"}, {"name": "f-int8", "path": "m"}]},
            None,
            "slm_models entry 2 (f-int8) and slm_models entry 1 (f) are both named 'f-int8'*",  # a ladder rung
        ),
        ({"slm_models": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}]}, ["only:c"], "--slm-only c*"),
    ],
)
def test_settings_refuse_a_run_of_models_that_cannot_be_told_apart(
    values: dict[str, object], cli: list[str] | None, message: str
) -> None:
    only = [c.removeprefix("only:") for c in cli or () if c.startswith("only:")] or None
    with pytest.raises(SettingsError) as info:
        _models(values, None if only else cli, only=only)
    assert fnmatch.fnmatchcase(str(info.value), message), str(info.value)


# -- the command line: merging reports, cache keys per model -----------------------------------------------------
def test_report_merge_shows_every_model_and_fails_on_any(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_slmdeploy.cli import main
    from pytest_slmdeploy.report import FamilyResult, RunReport

    good = RunReport(model={"name": "a", "precision": "int4"}, families={"format": FamilyResult("format", passed=3)})
    bad = RunReport(model={"name": "b", "precision": "int8"}, families={"format": FamilyResult("format", failed=1)})
    (tmp_path / "a.json").write_text(json.dumps(good.to_json()))
    (tmp_path / "b.json").write_text(json.dumps({"ok": False, "models": [bad.to_json()]}))  # a run of several
    assert main(["report", "merge", str(tmp_path / "a.json")]) == 0
    assert "## pytest-slmdeploy: 1 model, all passed" in capsys.readouterr().out
    assert main(["report", "merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    out = capsys.readouterr().out
    assert "## pytest-slmdeploy: 2 models, 1 of 2 FAILED (b)" in out
    assert "| a | int4 | ✅ |" in out
    assert "| b | int8 | ❌ |" in out
    assert "### pytest-slmdeploy: b FAILED" in out
    assert main(["report", "merge", str(tmp_path / "gone.json")]) == 2
    assert "gone.json: not a --slm-report file" in capsys.readouterr().err


def test_cache_keys_per_model_of_the_table(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pytest_slmdeploy.cli import main

    (tmp_path / "pyproject.toml").write_text(_table(tiny_model, tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    keys = {}
    for name in NAMES:
        assert main(["fingerprint", "--cache-key", "--name", name]) == 0
        keys[name] = capsys.readouterr().out.strip()
    assert main(["fingerprint", str(tiny_model), "--cache-key", "--precision", "int8"]) == 0
    assert capsys.readouterr().out.strip() == keys["faq-int8"] == keys["faq-int4"].replace("-int4-", "-int8-")
    assert main(["fingerprint", "--cache-key"]) == 0  # a job that checks the whole table: one key for both builds
    both = capsys.readouterr().out.strip()
    assert "-2models-" in both
    assert both not in keys.values()
    assert main(["fingerprint", "--cache-key", "--name", "faq-fp32"]) == 2
    assert "no model named 'faq-fp32' in the pytest configuration (faq-int4, faq-int8)" in capsys.readouterr().err


def test_a_model_in_addopts_is_replaced_by_the_command_lines(
    pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path
) -> None:
    """addopts = --slm-model A and pytest --slm-model B: B alone, as before several models were possible."""
    pytester.makeini(f"[pytest]\naddopts = --slm-model={tmp_path / 'elsewhere'}\n")
    result = pytester.runpytest(f"--slm-model=faq-one={tiny_model}", f"--slm-cache={tmp_path / 'c'}", "--co")
    assert result.ret == pytest.ExitCode.OK, result.stderr.str()
    result.stdout.fnmatch_lines(["slmdeploy: * -> faq-one [[]int4[]]"])  # named on the command line
    result.stdout.fnmatch_lines(["*<Function test_model_loads_and_answers>"])  # one model: ids as before


def test_bench_history_shows_a_table_per_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_slmdeploy.bench import History, RunRecord
    from pytest_slmdeploy.cli import main

    history = History(tmp_path)
    for i, (model, tps) in enumerate([("a", 100.0), ("b", 50.0), ("a", 90.0), ("b", 55.0)]):
        history.append(RunRecord(f"run{i}", model, "f", "int4", {"decode_tps": tps}, created_at=1e9 + i))
    assert main(["bench", "--history", str(tmp_path), "history"]) == 0
    out = capsys.readouterr().out
    a, b = out.split("#### b")
    assert a.startswith("#### a")
    assert "run0" in a
    assert "run2" in a
    assert "run1" not in a
    assert "-10.0%" in a
    assert "+10.0%" in b
