"""Measure a Qwen2.5-0.5B-shaped model with random weights (performance work; nothing is downloaded).

    .venv/bin/python scripts/bench_0p5b.py [WORKDIR] [--runs 3]

Makes the model (1.9 GB fp32), builds it INT4 through the plugin, then runs the
built-in benchmark ``--runs`` times, saving each run to the history, and prints
the history table: run-to-run spread is the basis for the default gates.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

QWEN25_0P5B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
}


def make_model(out: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pytest_slmdeploy.testing.tinymodel import TinyModelSpec, make_tiny_chat_model

    if (out / "config.json").is_file():
        return out
    make_tiny_chat_model(out, TinyModelSpec(steps=1))  # a trained tokenizer and chat template
    eos, pad = 2, 0
    config = Qwen2Config(**QWEN25_0P5B, tie_word_embeddings=True, eos_token_id=eos, bos_token_id=pad, pad_token_id=pad)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        # Random weights would put the argmax anywhere in the 151,936-token vocabulary; keep answers
        # inside the tokenizer's vocabulary so they decode (the shape and the work stay the same).
        model.lm_head.weight[600:] = 0
    model.save_pretrained(out, safe_serialization=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir", type=Path, nargs="?", default=Path("/tmp/slmdeploy-0p5b"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model, cache, history = args.workdir / "qwen-0p5b-random", args.workdir / "cache", args.workdir / "history"
    start = time.perf_counter()
    make_model(model)
    print(f"model ready in {time.perf_counter() - start:.0f}s: {model}")
    for i in range(args.runs):
        command = [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--slm-model", str(model),
            "--slm-cache", str(cache), "-m", "slm_benchmark or slm_smoke", "--slm-bench-save",
            "--slm-bench-history", str(history), "--slm-bench-name", f"run{i + 1}", "-o", "slm_benchmark_rounds=5",
        ]  # fmt: skip
        subprocess.run(command, cwd=args.workdir, check=False)
    subprocess.run([sys.executable, "-m", "pytest_slmdeploy.cli", "bench", "--history", str(history), "history"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
