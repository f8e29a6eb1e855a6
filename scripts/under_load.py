"""Run the built-in suite on a model while other CPU-bound processes compete for the cores.

    .venv/bin/python scripts/under_load.py MODEL [--cache DIR] [--runs 20] [--burners 2] [--expect pass|fail:FAMILY]

A merge gate must never fail a healthy model because the machine is busy, and must
still catch a defective one. This starts ``--burners`` processes that spin on the
CPU (each ends by itself after ``--burn-seconds``), runs ``pytest --slm-model MODEL``
``--runs`` times, and prints per run the outcome, the failed families and the timing
verdicts left inconclusive. It exits 1 when a run does not meet ``--expect``:
``pass`` (every run passes) or ``fail:FAMILY`` (every run fails exactly that family).
Extra arguments after ``--`` go to pytest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BURN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def start_burners(count: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    """CPU-bound processes that stop by themselves (and are killed by the caller when done)."""
    return [subprocess.Popen([sys.executable, "-c", BURN.format(seconds=seconds)]) for _ in range(count)]


def run_suite(model: Path, cache: Path, report: Path, extra: list[str]) -> tuple[int, dict[str, Any], float, str]:
    command = [sys.executable, "-m", "pytest", "--slm-model", str(model), "--slm-cache", str(cache),
               "--slm-report", str(report), "--rootdir", str(report.parent), "-p", "no:cacheprovider", "-q",
               *extra]  # fmt: skip
    start = time.perf_counter()
    # From the report's folder, as in a fresh project: no test paths or ini of the caller's are picked up.
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=report.parent)
    seconds = time.perf_counter() - start
    if not report.is_file():
        crash = done.stderr.find("Fatal Python error")  # faulthandler: the innermost frames come first
        sys.stdout.write(
            done.stdout[-2000:] + (done.stderr[crash : crash + 3000] if crash >= 0 else done.stderr[-3000:])
        )
        return done.returncode, {}, seconds, done.stdout
    return done.returncode, json.loads(report.read_text()), seconds, done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the Hugging Face model folder")
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: a temporary folder)")
    parser.add_argument("--runs", type=int, default=20, help="runs of the built-in suite (default 20)")
    parser.add_argument("--burners", type=int, default=2, help="CPU-bound competing processes (default 2)")
    parser.add_argument("--burn-seconds", type=float, default=1800, help="longest life of a burner (default 1800)")
    parser.add_argument("--expect", default="pass", help="pass, or fail:FAMILY (e.g. fail:lengths)")
    parser.add_argument("--conftest", type=Path, default=None, help="a conftest.py to run with (e.g. a defect)")
    parser.add_argument("--keep", type=Path, default=None, help="write the whole output of unexpected runs here")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    # The runs start in a folder of their own: paths given relative to here must still find the model.
    args.model = args.model.resolve()
    args.cache = args.cache.resolve() if args.cache else None
    args.conftest = args.conftest.resolve() if args.conftest else None
    args.keep = args.keep.resolve() if args.keep else None
    expected_family = args.expect.removeprefix("fail:") if args.expect.startswith("fail:") else None
    with tempfile.TemporaryDirectory(prefix="slmdeploy-load-") as tmp:
        cache = args.cache or Path(tmp) / "cache"
        if args.conftest is not None:
            (Path(tmp) / "conftest.py").write_text(args.conftest.read_text())
        run_suite(args.model, cache, Path(tmp) / "warm.json", [*extra, "-m", "slm_smoke"])  # build before the load
        burners = start_burners(args.burners, args.burn_seconds)
        misses, inconclusive = 0, 0
        try:
            for run in range(1, args.runs + 1):
                report = Path(tmp) / f"run{run}.json"
                code, data, seconds, output = run_suite(args.model, cache, report, extra)
                families = data.get("families", [])
                failed = sorted(f["family"] for f in families if f["status"] == "FAIL")
                undecided = [m for f in families for m in f.get("inconclusive", [])]
                inconclusive += len(undecided)
                met = (code == 0 and not failed) if expected_family is None else (failed == [expected_family])
                misses += not met
                print(f"run {run:2d}: exit {code}, {seconds:5.1f}s, failed families {failed or '-'}, "
                      f"inconclusive {len(undecided)}{'' if met else '  <-- not as expected'}", flush=True)  # fmt: skip
                for message in undecided:
                    print(f"        inconclusive: {message}")
                gates = data.get("gates") or {}
                for reason in gates.get("reasons", []) if gates.get("status") == "failed" else []:
                    print(f"        gate failed: {reason}")
                if gates and gates.get("status") != "failed":
                    print(f"        gates: {gates.get('summary')}")
                if not met:  # why: pytest's short summary, and the whole output if asked
                    print("\n".join(f"        {line}" for line in output.splitlines() if line.startswith("FAILED")))
                    if args.keep is not None:
                        args.keep.mkdir(parents=True, exist_ok=True)
                        (args.keep / f"run{run}.txt").write_text(output)
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()
    print(f"{args.runs - misses}/{args.runs} runs as expected ({args.expect}) with {args.burners} CPU-bound "
          f"processes competing; {inconclusive} inconclusive timing verdicts")  # fmt: skip
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
