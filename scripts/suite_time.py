"""Time the full built-in suite on a model, warm: seconds per family, and as token-equivalents.

    .venv/bin/python scripts/suite_time.py [MODEL_DIR] [--workdir DIR] [--cache DIR] [--runs N]
        [--json FILE] [-- extra pytest args]

Without MODEL_DIR it makes the Qwen2.5-0.5B-shaped random-weights model of
scripts/bench_0p5b.py in WORKDIR (1.9 GB, about 2 minutes; reused once made).
A warm-up run of ``pytest --slm-model`` builds the model if needed; then ``--runs``
timed runs of the built-in suite, each with ``--junitxml``, give the suite's wall
time and the seconds per family (the JUnit testcase times, setup and teardown
included, summed by their ``slm_family`` property; "other" holds the tests without
one, "unaccounted" the wall time outside any test: startup, collection, summary).
Right after each run, a bare onnxruntime_genai loop on the installed model measures
decode tok/s (128-token prompt, 32 new tokens, greedy, median of 5 rounds), so the
time is also given in token-equivalents (seconds x bare decode tok/s), a figure that
travels between machines. Exits 1 only when a pytest run crashed (no report).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_0p5b import make_model  # sibling scripts (scripts/ is on sys.path)
from under_load import run_suite

from pytest_slmdeploy.bench import bare_decode
from pytest_slmdeploy.report import FAMILIES, FAMILY_PROPERTY

PROMPT_TOKENS = 128
NEW_TOKENS = 32
WARMUP_ROUNDS = 2
TIMED_ROUNDS = 5
SLOWEST = 10
FILLER = "The quick brown fox jumps over the lazy dog. "


@dataclass(frozen=True)
class Case:
    """One JUnit testcase: its id, family and seconds (setup, call and teardown)."""

    test: str
    family: str
    seconds: float
    outcome: str  # passed, failed or skipped


def read_junit(path: Path) -> list[Case]:
    """The testcases of a JUnit XML file, with their ``slm_family`` property ("other" without one)."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iterfind("properties/property")}
        classname, name = case.get("classname", ""), case.get("name", "")
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        family = props.get(FAMILY_PROPERTY) or "other"
        test = f"{classname}::{name}" if classname else name
        cases.append(Case(test, family, float(case.get("time", 0) or 0), outcome))
    return cases


def session_seconds(path: Path) -> float:
    """pytest's own session time in a JUnit XML file (from session start to finish: tests and collection)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return sum(float(suite.get("time", 0) or 0) for suite in suites)


def family_seconds(cases: list[Case], wall_s: float) -> dict[str, float]:
    """Seconds per family (FAMILIES' order, then unknown families, "other"), and "unaccounted" up to the wall."""
    sums: dict[str, float] = {}
    for case in cases:
        sums[case.family] = sums.get(case.family, 0.0) + case.seconds
    order = [f for f in FAMILIES if f in sums] + sorted(f for f in sums if f not in FAMILIES and f != "other")
    order += ["other"] if "other" in sums else []
    result = {family: round(sums[family], 3) for family in order}
    result["unaccounted"] = round(wall_s - sum(sums.values()), 3)
    return result


def slowest(cases: list[Case], count: int = SLOWEST) -> list[tuple[str, float]]:
    return [(c.test, round(c.seconds, 3)) for c in sorted(cases, key=lambda c: -c.seconds)[:count]]


def outcomes(cases: list[Case]) -> dict[str, int]:
    return {kind: sum(c.outcome == kind for c in cases) for kind in ("passed", "failed", "skipped")}


def token_equivalents(seconds: float, decode_tps: float) -> float:
    """Seconds expressed as the tokens the bare decode loop makes in that time on the same machine."""
    return seconds * decode_tps


def round_figures(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every figure of the report whose name mentions rounds, by family."""
    found: dict[str, dict[str, Any]] = {}
    for row in report.get("families", []):
        figures = {k: v for k, v in row.get("figures", {}).items() if "round" in k.lower()}
        if figures:
            found[row["family"]] = figures
    return found


def installed_folder(cache: Path, report: dict[str, Any]) -> Path:
    """The cache entry the run used: ``<cache>/custom/<name>/`` from the report, else the only entry."""
    name = report.get("model", {}).get("name")
    if name and (cache / "custom" / name / "genai_config.json").is_file():
        return cache / "custom" / str(name)
    entries = [p.parent for p in sorted((cache / "custom").glob("*/genai_config.json"))]
    if len(entries) != 1:
        raise SystemExit(f"cannot tell the installed model in {cache / 'custom'}: {[e.name for e in entries]}")
    return entries[0]


def prompt_ids(tokenizer: Any, count: int) -> list[int]:
    """Exactly ``count`` tokens: the tail of a long chat-templated user message (so it ends as a prompt does)."""
    text = FILLER * count
    messages = json.dumps([{"role": "user", "content": text}])
    with contextlib.suppress(RuntimeError):  # no usable chat template: the plain text decodes just as fast
        text = str(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    ids = [int(t) for t in tokenizer.encode(text)]
    if len(ids) < count:
        raise SystemExit(f"the filler text makes only {len(ids)} tokens, not {count}")
    return ids[-count:]


def decode_round(model: Any, ids: list[int]) -> float:
    """One greedy answer of exactly NEW_TOKENS tokens: (new tokens - 1) / seconds from the first to the last."""
    count, seconds = bare_decode(model, ids, NEW_TOKENS)
    if count != NEW_TOKENS - 1:
        raise SystemExit(f"the answer length was not fixed: {count + 1} new tokens, not {NEW_TOKENS}")
    return count / seconds


def bare_decode_tps(model_dir: Path) -> tuple[float, list[float]]:
    """Median decode tok/s of a bare onnxruntime_genai loop on the installed model (no plugin code), and the rounds."""
    import onnxruntime_genai as og

    from pytest_slmdeploy.runtime.ortgenai import load_native

    model = load_native(model_dir)  # the suite's default threads (slm_threads = auto)
    ids = prompt_ids(og.Tokenizer(model), PROMPT_TOKENS)
    context = int(json.loads((model_dir / "genai_config.json").read_text())["model"]["context_length"])
    if len(ids) + NEW_TOKENS > context:
        raise SystemExit(f"{len(ids)} + {NEW_TOKENS} tokens do not fit the {context}-token context")
    for _ in range(WARMUP_ROUNDS):
        decode_round(model, ids)
    rounds = [decode_round(model, ids) for _ in range(TIMED_ROUNDS)]
    return statistics.median(rounds), rounds


def fresh_folder(path: Path) -> Path:
    """An empty folder for one run (a report left by an earlier run would hide a crash)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def timed_run(model: Path, cache: Path, folder: Path, extra: list[str]) -> dict[str, Any] | None:
    """One run of the suite with JUnit XML, then the bare decode speed: the run's JSON record (None: crashed)."""
    junit = folder / "junit.xml"
    code, report, wall_s, _ = run_suite(model, cache, folder / "report.json", [f"--junitxml={junit}", *extra])
    if not report or not junit.is_file():
        return None
    cases = read_junit(junit)
    tps, rounds = bare_decode_tps(installed_folder(cache, report))
    return {
        "wall_s": round(wall_s, 3),
        "bare_decode_tps": round(tps, 1),
        "bare_decode_rounds": [round(r, 1) for r in rounds],
        "token_equivalents": round(token_equivalents(wall_s, tps)),
        "families": family_seconds(cases, wall_s),
        "session_s": round(session_seconds(junit), 3),
        "slowest": [list(pair) for pair in slowest(cases)],
        "exit_code": code,
        **outcomes(cases),
        "round_figures": round_figures(report),
    }


def table(run: dict[str, Any]) -> list[str]:
    """The run as readable lines: family, seconds, share, token-equivalents; totals; slowest tests; rounds."""
    wall, tps = run["wall_s"], run["bare_decode_tps"]
    lines = [f"  {'family':<12} {'seconds':>8} {'share':>7} {'token-equivalents':>18}"]
    for family, seconds in run["families"].items():
        share = seconds / wall if wall else 0.0
        lines.append(f"  {family:<12} {seconds:8.2f} {share:7.1%} {token_equivalents(seconds, tps):18,.0f}")
    lines.append(f"  {'total':<12} {wall:8.2f} {1:7.1%} {run['token_equivalents']:18,.0f}")
    inside = run["session_s"] - sum(s for f, s in run["families"].items() if f != "unaccounted")
    lines.append(f"  unaccounted: {wall - run['session_s']:.2f}s outside pytest's session (interpreter, imports, "
                 f"configure with the source check; terminal summary), {inside:.2f}s in it between tests "
                 "(collection)")  # fmt: skip
    lines.append(f"  slowest {len(run['slowest'])} tests (seconds, setup and teardown included)")
    lines += [f"  {seconds:8.2f}  {test}" for test, seconds in run["slowest"]]
    if run["round_figures"]:
        lines.append("  report figures that mention rounds")
        for family, figures in run["round_figures"].items():
            lines += [f"    {family}: {name} = {value}" for name, value in figures.items()]
    return lines


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """The script's own arguments, and the pytest arguments after ``--``."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?", help="Hugging Face model folder (default: the 0.5B-shaped one)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slmdeploy-0p5b"),
                        help="for the made model, the cache and the runs (default /tmp/slmdeploy-0p5b)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default WORKDIR/cache)")
    parser.add_argument("--runs", type=int, default=1, help="timed warm runs (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs to this JSON file")
    own, extra = split_extra(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    workdir: Path = args.workdir.resolve()
    cache: Path = (args.cache or workdir / "cache").resolve()
    if args.model is None:
        start = time.perf_counter()
        model = make_model(workdir / "qwen-0p5b-random")
        print(f"model ready in {time.perf_counter() - start:.0f}s: {model}", flush=True)
    else:
        model = args.model
    model = model.resolve()
    runs_dir = workdir / "suite_time"
    code, report, seconds, _ = run_suite(model, cache, fresh_folder(runs_dir / "warmup") / "report.json", extra)
    print(f"warm-up: exit {code}, {seconds:.1f}s, cache {report.get('model', {}).get('cache', '?')}", flush=True)
    if not report:
        print("warm-up run crashed: no report")
        return 1
    runs: list[dict[str, Any]] = []
    status = 0
    for i in range(1, args.runs + 1):
        run = timed_run(model, cache, fresh_folder(runs_dir / f"run{i}"), extra)
        if run is None:
            print(f"run {i}: crashed, no report")
            status = 1
            break
        runs.append(run)
        print(f"run {i}: exit {run['exit_code']}, {run['passed']} passed, {run['failed']} failed, "
              f"{run['skipped']} skipped; wall {run['wall_s']:.1f}s; bare decode {run['bare_decode_tps']:,.1f} tok/s "
              f"(median of {TIMED_ROUNDS}, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new)")  # fmt: skip
        print("\n".join(table(run)), flush=True)
    if len(runs) > 1:
        print(f"median of {len(runs)} runs: wall {statistics.median(r['wall_s'] for r in runs):.1f}s, "
              f"bare decode {statistics.median(r['bare_decode_tps'] for r in runs):,.1f} tok/s, "
              f"{statistics.median(r['token_equivalents'] for r in runs):,.0f} token-equivalents")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({"model": str(model), "runs": runs}, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
