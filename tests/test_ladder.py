"""The precision ladder and the fidelity family: units with fake rungs, then real tiny models end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_json

from pytest_slmdeploy.fidelity import prompt_set
from pytest_slmdeploy.ladder import RUNGS, Ladder, Rung, climb, rung_settings
from pytest_slmdeploy.settings import Settings
from pytest_slmdeploy.testing.tinydefects import OutlierReport
from pytest_slmdeploy.testing.tinymodel import FAQ

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SCHEMA = {"precision", "passed", "size_ratio", "decode_tps", "ttft_ms", "peak_rss_mb", "answers_identical",
          "top1_agreement", "mean_kld"}  # fmt: skip


# -- units ---------------------------------------------------------------------------------------
def _judge(passing: set[str], tried: list[str]) -> object:
    def evaluate(precision: str) -> Rung:
        tried.append(precision)
        ok = precision in passing
        return Rung(precision, f"m-{precision}", ok, () if ok else (f"{precision} drifted",))

    return evaluate


@pytest.mark.parametrize(
    ("passing", "chosen", "tried"),
    [
        ({"int4", "int8", "fp32"}, "int4", ["int4"]),
        ({"int8", "fp32"}, "int8", ["int4", "int4-mixed", "int8"]),
        ({"fp32"}, "fp32", ["int4", "int4-mixed", "int8", "fp32"]),
        (set(), None, ["int4", "int4-mixed", "int8", "fp32"]),
    ],
)
def test_climb_stops_at_the_first_rung_that_passes(passing: set[str], chosen: str | None, tried: list[str]) -> None:
    seen: list[str] = []
    ladder = climb(_judge(passing, seen))  # type: ignore[arg-type]
    assert ladder.chosen == chosen
    assert seen == tried
    assert [r.precision for r in ladder.rungs] == tried
    notes = ladder.notes()
    assert [n for n in notes if "rejected" in n] == [f"precision auto: {p} rejected: {p} drifted" for p in tried
                                                     if p not in passing]  # fmt: skip
    assert notes[-1].startswith("precision auto: chose" if chosen else "precision auto: no rung passed")


def test_every_rung_measures_past_the_choice() -> None:
    seen: list[str] = []
    ladder = climb(_judge({"int8", "fp32"}, seen), every_rung=True)  # type: ignore[arg-type]
    assert seen == list(RUNGS)
    assert ladder.chosen == "int8"
    table = ladder.table()
    assert len(table) == 2 + len(RUNGS)
    assert table[2 + RUNGS.index("int8")].endswith("| yes (chosen) |")
    assert table[2 + RUNGS.index("fp32")].endswith("| yes |")


def test_json_has_the_issue_schema() -> None:
    ladder = Ladder((Rung("int4", "m-int4", False, ("top-1 agreement 80.0% < 95.0%",), top1_agreement=0.8),), None)
    data = json.loads(json.dumps(ladder.to_json()))
    assert data["chosen"] is None
    assert set(data["rungs"][0]) >= SCHEMA
    assert data["rungs"][0]["reasons"] == ["top-1 agreement 80.0% < 95.0%"]


def test_rungs_have_names_of_their_own(tmp_path: Path) -> None:
    settings = Settings(model=tmp_path / "My Model", precision="auto")
    assert rung_settings(settings, "int8").model_name == "my-model-int8"
    named = Settings(model=tmp_path / "m", precision="auto", name="support-bot")
    assert rung_settings(named, "fp32").model_name == "support-bot-fp32"
    assert rung_settings(named, "fp32").precision == "fp32"


def test_prompt_set_puts_the_domain_first_without_repeats() -> None:
    system = {"role": "system", "content": "s"}
    domain = [({"role": "user", "content": "a"},), (system, {"role": "user", "content": "b"})]
    chosen = prompt_set(domain, ["a", "c", "d"], limit=3)
    assert chosen == [[{"role": "user", "content": "a"}], [dict(m) for m in domain[1]], "c"]


# -- real tiny models ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ladder_cache(fidelity_root: Path) -> Path:
    return fidelity_root / "ladder-cache"  # shared with xdist workers: each rung builds once per run


def _ladder(
    model: Path, cache: Path, out: Path, *args: str, cwd: Path | None = None
) -> tuple[int, dict[str, object], str]:
    """``slmdeploy ladder`` as users run it: its own process (torch, Olive and ONNX Runtime in one), in ``cwd``
    (whose pytest configuration sets its limits)."""
    command = [sys.executable, "-m", "pytest_slmdeploy.cli", "--cache", str(cache), "ladder", str(model),
               "--json", str(out), *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900, cwd=cwd)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return done.returncode, read_json(out), done.stdout


def test_ladder_picks_int4_for_a_healthy_model(tiny_model: Path, ladder_cache: Path, tmp_path: Path) -> None:
    code, data, out = _ladder(tiny_model, ladder_cache, tmp_path / "ladder.json")
    assert code == 0
    assert data["chosen"] == "int4"
    rungs = data["rungs"]
    assert isinstance(rungs, list)
    assert len(rungs) == 1, "the ladder stops at the first rung that passes"
    rung = rungs[0]
    assert set(rung) >= SCHEMA
    assert rung["passed"] is True
    assert rung["top1_agreement"] >= 0.95
    assert rung["cases_passed"] == rung["cases_total"] == len(FAQ)  # the model folder's own slm_cases.yaml
    assert 0 < rung["size_ratio"] < 1
    assert rung["decode_tps"] > 0
    assert rung["ttft_ms"] > 0
    assert 20 < rung["peak_rss_mb"] < 2000  # a process running only this model (not this test's process)
    assert "| int4 |" in out
    assert "chosen: int4" in out


def test_ladder_does_not_pick_int4_for_an_outlier_model(
    outlier: OutlierReport, ladder_cache: Path, tmp_path: Path
) -> None:
    # Scored on its own FAQ: the toy model's answers to general prompts are unsure, and on them its int8 build's
    # agreement (95.6%, interval 93.8-96.9%) straddles the limit, which ships no rung: the ladder then takes fp32.
    (tmp_path / "pytest.ini").write_text(f"[pytest]\nslm_fidelity_max_prompts = {len(FAQ)}\n")
    code, data, out = _ladder(
        outlier.out_dir, ladder_cache, tmp_path / "ladder.json", "--all", "--no-speed", cwd=tmp_path
    )
    assert code == 0
    rungs = {r["precision"]: r for r in data["rungs"]}  # type: ignore[union-attr]
    assert list(rungs) == list(RUNGS), "--all measures every rung"
    assert data["chosen"] == "int8", rungs["int8"]["reasons"]
    assert rungs["int4-mixed"]["passed"] is False
    assert rungs["int4"]["passed"] is False
    assert any(r.startswith(("mean KLD", "top-1 agreement")) for r in rungs["int4"]["reasons"])
    assert rungs["int8"]["top1_agreement"] >= 0.95
    assert rungs["fp32"]["mean_kld"] < 1e-6  # the same function, in the same precision
    assert rungs["int8"]["decode_tps"] is None  # --no-speed
    assert "int4 rejected: " in out


def _run(pytester: pytest.Pytester, model: Path, cache: Path, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "--slm-model", str(model), "--slm-cache", str(cache), "--rootdir", str(pytester.path),
        "-p", "no:cacheprovider", "--slm-report", "report.json", *args,
    )  # fmt: skip


def test_fidelity_family_fails_the_outlier_model_at_int4(
    pytester: pytest.Pytester, outlier: OutlierReport, ladder_cache: Path
) -> None:
    result = _run(pytester, outlier.out_dir, ladder_cache, "-m", "slm_fidelity or slm_smoke")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the deployed model drifted from its source: *mean KLD * > 0.1*",
            "worst prompts (highest KLD):",
            "*source: *",
            "*deployed: *",
            "FAIL *6. Faithful to the fine-tuned source*0/1*answers identical */*top-1 agreement %*",
        ]
    )
    families = {f["family"]: f for f in read_json(pytester.path / "report.json")["families"]}  # type: ignore[union-attr]
    assert families["fidelity"]["status"] == "FAIL"
    assert families["smoke"]["status"] == "pass"
    assert families["fidelity"]["figures"]["mean KLD"] > 0.1


def test_precision_auto_tests_the_first_faithful_rung(
    pytester: pytest.Pytester, outlier: OutlierReport, ladder_cache: Path
) -> None:
    result = _run(pytester, outlier.out_dir, ladder_cache, "--slm-precision", "auto", "-m",
                  "slm_fidelity or slm_domain or slm_smoke",
                  "-o", f"slm_fidelity_max_prompts={len(FAQ)}")  # fmt: skip  # its own FAQ: see the test above
    result.assert_outcomes(passed=4 + len(FAQ))
    result.stdout.fnmatch_lines(
        [
            "slmdeploy: * -> outlier-*-int4 [[]auto: smallest faithful of int4, int4-mixed, int8, fp32[]]",
            "outlier-*-int8 [[]int8[]]: *",
            "*note: precision auto: int4 rejected: *",
            "*note: precision auto: chose int8*",
            "*| int4 |*| no |",
            "*| int8 |*| yes (chosen) |",
        ]
    )
    report = read_json(pytester.path / "report.json")
    assert report["model"]["precision"] == "int8"  # type: ignore[index]
    ladder = report["ladder"]
    assert isinstance(ladder, dict)
    assert ladder["chosen"] == "int8"
    assert [r["precision"] for r in ladder["rungs"]] == ["int4", "int4-mixed", "int8"]
    assert any("int4 rejected" in note for note in report["notes"])  # type: ignore[union-attr]


def test_fidelity_reaches_the_history_and_gates_a_drop(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path
) -> None:
    history = pytester.path / "history"
    args = ("-m", "slm_fidelity", "--slm-bench-history", str(history))
    _run(pytester, tiny_model, warm_cache, *args, "--slm-bench-save").assert_outcomes(passed=1)
    record = json.loads((history / "faq-int4.jsonl").read_text().splitlines()[-1])
    top1 = record["metrics"]["top1_agreement"]
    assert 95 <= top1 <= 100
    assert record["metrics"]["mean_kld"] >= 0
    same = _run(pytester, tiny_model, warm_cache, *args, "--slm-bench-baseline", "last",
                "--slm-bench-gate", "top1_agreement:-1%")  # fmt: skip
    same.assert_outcomes(passed=2)  # the fidelity test and the gate item
    same.stdout.fnmatch_lines(["benchmark gates passed against *top1_agreement +0.0% (limit -1%)*"])
    # A baseline that kept more of the source's tokens than this build does: a drop past the gate fails.
    better = {**record, "name": "better", "metrics": {**record["metrics"], "top1_agreement": top1 + 2}}
    (pytester.path / "better.json").write_text(json.dumps(better))
    dropped = _run(pytester, tiny_model, warm_cache, *args, "--slm-bench-baseline", "better.json",
                   "--slm-bench-gate", "top1_agreement:-1%")  # fmt: skip
    dropped.assert_outcomes(passed=1, failed=1)
    dropped.stdout.fnmatch_lines(["*top1_agreement dropped *% vs baseline * % (limit -1%)*"])
