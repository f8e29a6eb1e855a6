"""Decode speed of one installed model under each thread setting, on a quiet machine and beside busy processes.

Issue 21, item 10: two intra-op threads on a 2-core machine decode fastest when the machine is quiet, and
collapse when anything else runs (ONNX Runtime's threads spin and wait on each other at every operator). This
script measures every setting under every load in one run, settings interleaved round by round so a drift of
the machine hits them alike, and prints one table:

    .venv/bin/python scripts/threads_under_load.py <installed model folder> [--rounds 5] [--tokens 64]

Loads: quiet; one CPU-bound process at nice 19 (a background job); two CPU-bound processes at normal priority
(the checklist's "busy machine"). Settings: threads 1 and 2, ONNX Runtime's intra-op spinning on and off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median

BUSY = "while True: pass"
LOADS: dict[str, list[int]] = {"quiet": [], "1 busy (nice 19)": [19], "2 busy": [0, 0]}


def settings(cpus: int) -> dict[str, dict[str, object]]:
    """Thread settings to compare: each a genai_config ``session_options`` overlay."""
    found: dict[str, dict[str, object]] = {}
    for threads in sorted({1, cpus}):
        for spin in ("1", "0"):
            found[f"{threads} thread{'s' if threads > 1 else ''}, spin {'on' if spin == '1' else 'off'}"] = {
                "intra_op_num_threads": threads,
                "session.intra_op.allow_spinning": spin,
            }
    return found


@contextlib.contextmanager
def busy(nices: list[int]) -> Iterator[None]:
    procs = [subprocess.Popen(["nice", "-n", str(n), sys.executable, "-c", BUSY]) for n in nices]
    try:
        time.sleep(0.5 if procs else 0)  # let the scheduler see them
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def decode_tps(model: object, tokenizer: object, og: object, prompt: str, tokens: int) -> float:
    """Tokens after the first, per second, for one greedy answer of exactly ``tokens`` tokens."""
    params = og.GeneratorParams(model)  # type: ignore[attr-defined]
    ids = tokenizer.encode(prompt)  # type: ignore[attr-defined]
    params.set_search_options(max_length=len(ids) + tokens, min_length=len(ids) + tokens, do_sample=False)
    generator = og.Generator(model, params)  # type: ignore[attr-defined]
    generator.append_tokens(ids)
    generator.generate_next_token()  # the first token: prefill
    start = time.perf_counter()
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an installed model folder (with genai_config.json)")
    parser.add_argument("--rounds", type=int, default=5, help="timed answers per setting and load")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import onnxruntime_genai as og

    cpus = len(os.sched_getaffinity(0))
    models = {}
    for name, options in settings(cpus).items():
        config = og.Config(str(args.model))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        models[name] = og.Model(config)
    tokenizer = og.Tokenizer(next(iter(models.values())))
    prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
    results: dict[str, dict[str, float]] = {}
    for load, nices in LOADS.items():
        runs: dict[str, list[float]] = {name: [] for name in models}
        with busy(nices):
            for model in models.values():  # warm-up, untimed
                decode_tps(model, tokenizer, og, prompt, 8)
            for _ in range(args.rounds):
                for name, model in models.items():  # interleaved: a drift hits every setting alike
                    runs[name].append(decode_tps(model, tokenizer, og, prompt, args.tokens))
        results[load] = {name: median(values) for name, values in runs.items()}
    loads = list(LOADS)
    print(f"decode tok/s, median of {args.rounds} answers of {args.tokens} tokens; {cpus} CPUs; {args.model.name}")
    print(f"{'setting':<24}" + "".join(f"{load:>20}" for load in loads) + f"{'worst/best':>12}")
    for name in models:
        figures = [results[load][name] for load in loads]
        print(f"{name:<24}" + "".join(f"{value:>20.1f}" for value in figures) + f"{min(figures) / max(figures):>12.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "cpus": cpus, "tokens_per_s": results}, indent=2))


if __name__ == "__main__":
    main()
