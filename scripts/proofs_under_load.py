"""Each defect proof of tests/test_checklist_proofs.py, 20 whole-suite runs under two CPU-bound processes.

    .venv/bin/python scripts/proofs_under_load.py [--runs 20] [--only NAME ...] [--work DIR]

Issue 21 asks that every proof fail only its family in 20 of 20 runs with two CPU-bound processes competing,
and the healthy example model pass 20 of 20 under the same load. This writes each proof's conftest (the same
text the tests use), makes the models the fidelity proofs build from (the FAQ model trained from another seed,
and the example model with noise of 0.42 x each weight matrix's RMS), and runs ``scripts/under_load.py`` on the
example model for each. It prints one line per proof and exits 1 if any run was not as expected.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "example_project" / "model"
CACHE = ROOT / "example_project" / ".slmdeploy-cache"


def proofs(work: Path) -> dict[str, tuple[str, str, bool]]:
    """name -> (conftest text, expected outcome, needs a cache of its own: the defect is in the build)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_checklist_proofs as t

    from pytest_slmdeploy.testing.tinydefects import perturbed_copy
    from pytest_slmdeploy.testing.tinymodel import TinyModelSpec, make_tiny_chat_model

    other = work / "other-checkpoint"
    if not (other / "config.json").is_file():
        make_tiny_chat_model(other, TinyModelSpec(seed=1))
    near = work / f"perturbed-{t.NEAR_LIMIT_NOISE:g}"
    if not (near / "config.json").is_file():
        perturbed_copy(MODEL, near, t.NEAR_LIMIT_NOISE, seed=1)
    found: dict[str, tuple[str, str, bool]] = {"healthy": ("", "pass", False)}
    for kind, (condition, size) in t.KIND_LEAKS.items():
        found[f"leak: {kind}"] = (t.KIND_LEAK.format(condition=condition, size=size), "fail:memory", False)
    for setting, drop in t.DROPS.items():
        found[f"drops {setting}"] = (t.DROPS_ONE_SETTING.format(drop=drop), "fail:edge", False)
    for slowdown, (first, step, _) in t.SLOWDOWNS.items():
        found[slowdown] = (t.SLOW_WITH_LENGTH.format(first=first, step=step), "fail:lengths", False)
    found["PromptTemplate without its system part"] = (t.DROPPED_TEMPLATE_PART, "fail:format", True)
    found["another checkpoint"] = (t.BUILT_FROM.format(path=str(other)), "fail:fidelity", True)
    found["3 points under the top-1 limit"] = (t.BUILT_FROM.format(path=str(near)), "fail:fidelity", True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", nargs="*", default=None, help="proof names (default: all)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slmdeploy-proofs"), help="models, caches, logs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    failed = []
    for index, (name, (conftest, expect, own_cache)) in enumerate(proofs(args.work).items()):
        if args.only is not None and name not in args.only:
            continue
        command = [sys.executable, str(ROOT / "scripts" / "under_load.py"), str(MODEL), "--runs", str(args.runs),
                   "--expect", expect, "--keep", str(args.work / f"unexpected-{index}"),
                   "--cache", str(args.work / f"cache-{index}" if own_cache else CACHE)]  # fmt: skip
        if conftest:
            path = args.work / f"conftest-{index}.py"
            path.write_text(conftest)
            command += ["--conftest", str(path)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        (args.work / f"log-{index}.txt").write_text(done.stdout + done.stderr)
        last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
        print(f"{name}: {last}", flush=True)
        if done.returncode:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
