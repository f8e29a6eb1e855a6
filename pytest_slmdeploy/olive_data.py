"""Calibration data for Olive's passes that need it (GPTQ), made from the source model itself.

Olive imports this file as the data config's ``user_script`` (see ``recipes.calibration``). Nothing is
downloaded (Olive's default, wikitext through the ``datasets`` package, needs the hub): the source answers the
built-in calibration instructions greedily, and each instruction with its answer, in the model's own chat
template, is one calibration text. None of these instructions is a prompt the checklist judges a build on, so
fidelity and the domain cases stay out-of-sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from olive.data.registry import Registry

from pytest_slmdeploy.recipes import CALIBRATION_CACHE_ENV, CALIBRATION_DATASET, CALIBRATION_SOURCE_ENV

# Where build.run_olive keeps the source's calibration answers between builds (the ladder's int4 rungs share them),
# and the source's content fingerprint they are keyed on (no fingerprint, no reuse).
CACHE_ENV, SOURCE_ENV = CALIBRATION_CACHE_ENV, CALIBRATION_SOURCE_ENV
SCHEMA = 2  # how the answers are made (batched, left-padded, cut after the first end token): a change makes anew


def _cached_texts_path(params: dict[str, Any]) -> Path | None:
    """The answers' file for this source's content and these settings, or None."""
    folder, source = os.environ.get(CACHE_ENV), os.environ.get(SOURCE_ENV)
    if not folder or not source:
        return None
    import tokenizers
    import torch
    import transformers

    from pytest_slmdeploy import __version__

    versions = (torch.__version__, transformers.__version__, tokenizers.__version__, __version__)
    key = json.dumps([source, params, SCHEMA, versions], sort_keys=True)
    return Path(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _read_texts(path: Path, count: int) -> list[str] | None:
    """The cached answers, or None when missing, unreadable or not one per instruction (then made anew)."""
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(texts, list) and len(texts) == count and all(isinstance(t, str) for t in texts)
    return texts if ok else None


def _write_texts(path: Path, texts: list[str]) -> None:
    """Atomically, through a file of this writer's own (two builds of one source may write at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".partial", delete=False) as fh:
        json.dump(texts, fh)
    Path(fh.name).replace(path)


@Registry.register_dataset(CALIBRATION_DATASET)  # type: ignore[untyped-decorator]  # Olive is untyped
def calibration_dataset(
    source: str,
    instructions: list[str],
    answer_tokens: int = 64,
    seq_len: int = 128,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    **_: Any,
) -> list[tuple[Any, Any]]:
    """Instruction + the source's own greedy answer, joined and cut into ``seq_len``-token rows (inputs, labels)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if chat_template is not None:  # the user's choice over the model's own (--slm-chat-template), as deployed
        tokenizer.chat_template = chat_template
    params = {"instructions": instructions, "answer_tokens": answer_tokens, "chat_template": chat_template,
              "trust_remote_code": trust_remote_code}  # fmt: skip
    cached = _cached_texts_path(params)
    texts = _read_texts(cached, len(instructions)) if cached is not None else None
    if texts is None:
        texts = _answers(source, tokenizer, instructions, answer_tokens, trust_remote_code)
        if cached is not None:
            _write_texts(cached, texts)
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    while len(ids) < seq_len:  # a tiny model's short answers: repeat rather than give GPTQ nothing
        ids = ids + ids
    rows = []
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        row = torch.tensor(ids[start : start + seq_len])
        rows.append(({"input_ids": row, "attention_mask": torch.ones_like(row)}, row))
    return rows


def _answers(
    source: str, tokenizer: Any, instructions: list[str], answer_tokens: int, trust_remote_code: bool, batch: int = 8
) -> list[str]:
    """Each instruction in the chat template, followed by the source's greedy answer (up to and with its first end
    token). Batched, left-padded: one at a time, SmolLM2-135M's 40 answers took 136 s of a build on 2 cores."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    eos = model.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(ends), 0)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": i}], add_generation_prompt=True, tokenize=False)
        for i in instructions
    ]
    side, had_pad = tokenizer.padding_side, tokenizer.pad_token
    if had_pad is None:  # only the padding of these batches reads it (masked out)
        tokenizer.pad_token_id = pad
    tokenizer.padding_side = "left"
    texts = []
    try:
        with torch.inference_mode():
            for first in range(0, len(prompts), batch):
                chunk = prompts[first : first + batch]
                ids = tokenizer(chunk, add_special_tokens=False, return_tensors="pt", padding=True)
                out = model.generate(**ids, max_new_tokens=answer_tokens, do_sample=False, pad_token_id=pad)
                for prompt, row in zip(chunk, out[:, ids["input_ids"].shape[1] :].tolist(), strict=True):
                    cut = next((k + 1 for k, token in enumerate(row) if token in ends), len(row))
                    texts.append(prompt + tokenizer.decode(row[:cut], skip_special_tokens=False))
    finally:
        tokenizer.padding_side = side
        if had_pad is None:
            tokenizer.pad_token = None
    return texts
