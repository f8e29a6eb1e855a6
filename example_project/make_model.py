"""Make this project's "fine-tuned" model: a tiny chat model trained on our shop FAQ (seconds on a CPU).

In a real project this folder comes from your fine-tuning job; here it is made
on the spot so the example runs offline. Run: python make_model.py [--force]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pytest_slmdeploy.testing.tinymodel import make_tiny_chat_model

MODEL_DIR = Path(__file__).parent / "model"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="train again even if model/ exists")
    args = parser.parse_args()
    if (MODEL_DIR / "config.json").is_file() and not args.force:
        print(f"{MODEL_DIR} exists (use --force to train again)")
        return 0
    start = time.perf_counter()
    make_tiny_chat_model(MODEL_DIR)
    print(f"trained {MODEL_DIR} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
