"""Builds of one source side by side: this project's rungs and recipes, and (optionally) llama.cpp's quants.

For each build, in one run on one machine: file size, decode tok/s and TTFT (128-token prompt, 32 new tokens,
the same threads; every build loaded at once and timed in turn, median of 9 interleaved rounds after a warm-up
round, and each build's decode speed over the reference's (``--reference``, default the first GGUF) round by
round), and fidelity against the source in transformers fp32 over the
full vocabulary: 12 general prompts, the source's 32-token greedy answers teacher-forced one token at a time
(answers identical, exact top-1, mean KLD(source || build)). Both runtimes get the same token ids (the source
tokenizer's chat template; llama.cpp is fed ids, never text, so no BOS is added) and are judged by one function.

    .venv/bin/python scripts/peer_bench.py SOURCE_DIR --onnx int4=CACHE/custom/x-int4 --onnx int8=... \
        [--gguf q8_0=model-q8_0.gguf ...] [--llama-cpp-quants f32,q8_0,q4_k_m,q4_0,q4_1] [--json out.json]

llama.cpp comes from llama-cpp-python (the optional extra ``peer``), never in CI; see docs/benchmarks.md. It is
imported only when a llama.cpp build is asked for. The PyPI wheel of 0.3.36 is built from the sdist; a plain
build picks up AMX on CPUs that have it, and every quantized GGUF then segfaults on the first decode
(``ggml_backend_amx_mul_mat``, llama.cpp issue #20824). The build used here (17 min, 8 min of CPU, on a busy
2-core machine; no AMX instruction in ``libggml-cpu.so`` afterwards)::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d SRC
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    CMAKE_BUILD_PARALLEL_LEVEL=1 MAKEFLAGS=-j1 \
    nice -n 19 .venv/bin/pip wheel --no-deps --no-cache-dir -w WHEELS SRC/llama_cpp_python-0.3.36.tar.gz
    .venv/bin/pip install --no-deps WHEELS/llama_cpp_python-0.3.36-*.whl diskcache

``--llama-cpp-quants`` converts SOURCE to an F32 GGUF with llama.cpp's ``convert_hf_to_gguf.py`` (in the sdist
under ``vendor/llama.cpp/``; copy it with its ``conversion/`` and ``gguf-py/`` folders: PyPI's gguf 0.19.0
lacks ``LazyChunkedTensor``, and the converter puts its own ``gguf-py`` first on ``sys.path``), then quantizes
with ``llama_cpp.llama_model_quantize``. The converter also imports ``sentencepiece`` even for a
``tokenizer.json`` model; a ``deps/`` folder next to the converter (``pip install --target DIR/deps
sentencepiece``) goes on its ``PYTHONPATH``. Converted files are cached in ``--work-dir`` under a key of the
source's path and files, so reruns only measure.

llama.cpp stops a greedy answer at any of its end-of-generation ids (for SmolLM2: 0, 2 and 4, where
transformers and ONNX Runtime GenAI stop at 2 only). The wheel uses OpenMP, whose threads spin at every
barrier: when other work shares the cores, 2 threads can decode ten times slower than 1. Speeds from a busy
machine need ``OMP_WAIT_POLICY=passive`` (or an idle machine) to mean anything; fidelity does not depend on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain photosynthesis in simple terms.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in one sentence.",
    "What are the primary colors?",
    "How do I boil an egg?",
    "Name a planet in our solar system.",
    "Why is the sky blue?",
)
NEW_TOKENS = 32
SPEED_PROMPT_TOKENS = 128
SPEED_ROUNDS = 9
# llama.cpp sources, converter and converted GGUF files; outside git (.gitignore), never in CI.
PEER_DIR = Path(os.environ.get("SLMDEPLOY_PEER_DIR", Path(__file__).resolve().parents[1] / ".peer"))


@dataclass
class Reference:
    """The source's greedy answer to one prompt and its log-probabilities at every answer position."""

    prompt_ids: list[int]
    answer_ids: list[int]
    logprobs: NDArray[np.float32]  # (len(answer_ids), vocab): row i predicts answer_ids[i]
    prompt_text: str = ""  # the chat-templated prompt the ids came from (for a tokenizer check only)


def _log_softmax(logits: NDArray[Any]) -> NDArray[np.float64]:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    out: NDArray[np.float64] = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


def references(source: Path, prompts: Sequence[str] = PROMPTS, new_tokens: int = NEW_TOKENS) -> list[Reference]:
    """Greedy answers of the source in transformers fp32, and their full next-token distributions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    refs = []
    with torch.inference_mode():
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, output_scores=False,
                return_dict_in_generate=False, pad_token_id=tokenizer.pad_token_id or 0,
            )  # fmt: skip
            answer = [int(t) for t in out[0, len(ids) :]]
            # Score the answer as the source sees it, one forward pass over prompt + answer.
            logits = model(torch.tensor([ids + answer])).logits[0, len(ids) - 1 : len(ids) + len(answer) - 1]
            refs.append(Reference(ids, answer, _log_softmax(logits.numpy()).astype(np.float32), str(text)))
    return refs


@dataclass
class Fidelity:
    answers_identical: int
    answers_total: int
    positions: int
    exact_top1: float
    mean_kld: float


def _compare(
    refs: Sequence[Reference], deployed: Sequence[NDArray[np.float64]], answers: Sequence[list[int]]
) -> Fidelity:
    klds, agree, n = [], 0, 0
    for ref, logp in zip(refs, deployed, strict=True):
        p = ref.logprobs.astype(np.float64)
        kld = (np.exp(p) * (p - logp)).sum(axis=-1)
        klds.extend(kld.tolist())
        agree += int((p.argmax(axis=-1) == logp.argmax(axis=-1)).sum())
        n += len(ref.answer_ids)
    identical = sum(1 for ref, answer in zip(refs, answers, strict=True) if answer == ref.answer_ids)
    return Fidelity(identical, len(refs), n, agree / n, float(np.mean(klds)))


# ---------------------------------------------------------------- ONNX Runtime GenAI


def _og_model(folder: Path, threads: int) -> Any:
    from pytest_slmdeploy.runtime.ortgenai import load_native

    return load_native(folder, threads)


def score_onnx(folder: Path, refs: Sequence[Reference], threads: int) -> Fidelity:
    import onnxruntime_genai as og

    model = _og_model(folder, threads)
    deployed, answers = [], []
    for ref in refs:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ref.prompt_ids) + len(ref.answer_ids) + 1, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ref.prompt_ids)
        rows = []
        for token in ref.answer_ids:
            rows.append(np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)[-model_vocab(gen) :])
            gen.append_tokens([token])
        deployed.append(_log_softmax(np.stack(rows)))
        del gen
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ref.prompt_ids) + NEW_TOKENS, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ref.prompt_ids)
        answer: list[int] = []
        while not gen.is_done() and len(answer) < NEW_TOKENS:
            gen.generate_next_token()
            answer.append(int(gen.get_next_tokens()[0]))
        answers.append(answer)
        del gen
    return _compare(refs, deployed, answers)


def model_vocab(gen: Any) -> int:
    return int(np.asarray(gen.get_logits()).shape[-1])


def speed_ids(prompt_tokens: int = SPEED_PROMPT_TOKENS) -> list[int]:
    """The speed prompt, the same token ids for every runtime."""
    return [int(t) for t in np.random.default_rng(0).integers(100, 20000, prompt_tokens)]


Timing = tuple[float, float]  # (TTFT s, decode tok/s) of one generation


def onnx_timer(folder: Path, threads: int, prompt_tokens: int = SPEED_PROMPT_TOKENS) -> Callable[[], Timing]:
    """One timed generation of the speed prompt: TTFT, then decode tok/s over the next 31 tokens."""
    import onnxruntime_genai as og

    model = _og_model(folder, threads)
    ids = speed_ids(prompt_tokens)
    new_tokens = NEW_TOKENS

    def once() -> Timing:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_tokens + new_tokens, min_length=prompt_tokens + new_tokens)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            gen.generate_next_token()
        t2 = time.perf_counter()
        del gen
        return t1 - t0, (new_tokens - 1) / (t2 - t1)

    return once


def onnx_bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")
    )


# ---------------------------------------------------------------- llama.cpp (llama-cpp-python)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise SystemExit(f"llama.cpp builds need llama-cpp-python (see this script's docstring): {exc}") from exc
    return llama_cpp


def tensor_types(path: Path) -> str:
    """How many tensors of each type a GGUF file holds, e.g. ``q5_0 180, f32 61, q8_0 31``."""
    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name.lower() for t in GGUFReader(path).tensors)
    return ", ".join(f"{kind} {n}" for kind, n in counts.most_common())


def find_convert_script(explicit: Path | None) -> Path:
    """``--convert-script``, else the shallowest ``convert_hf_to_gguf.py`` under the peer folder."""
    if explicit is not None:
        if not explicit.is_file():
            raise SystemExit(f"no converter at {explicit}")
        return explicit
    found = sorted(PEER_DIR.glob("**/convert_hf_to_gguf.py"), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise SystemExit(f"no convert_hf_to_gguf.py under {PEER_DIR}; pass --convert-script")
    return found[0]


def _source_key(source: Path) -> str:
    """A key of the source's resolved path and its files' sizes and times: a rebuilt source gets new GGUFs."""
    h = hashlib.sha256(str(source.resolve()).encode())
    for f in sorted(source.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _ftype(llama_cpp: Any, quant: str) -> int:
    name = "LLAMA_FTYPE_ALL_F32" if quant.lower() == "f32" else f"LLAMA_FTYPE_MOSTLY_{quant.upper()}"
    if not hasattr(llama_cpp, name):
        raise SystemExit(f"llama.cpp knows no quantization type {quant!r} ({name})")
    return int(getattr(llama_cpp, name))


def convert_f32(source: Path, convert_script: Path, work_dir: Path) -> Path:
    """SOURCE -> F32 GGUF with llama.cpp's converter (cached)."""
    out = work_dir / f"{source.name}-{_source_key(source)}-f32.gguf"
    if out.is_file():
        return out
    work_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    env = dict(os.environ)
    deps = convert_script.parent / "deps"
    if deps.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(deps), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(convert_script), str(source), "--outtype", "f32", "--outfile", str(partial)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    partial.rename(out)
    print(f"converted {source} -> {out.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def quantize(f32: Path, quant: str, threads: int) -> Path:
    """F32 GGUF -> ``quant`` with ``llama_model_quantize`` (cached next to the F32 file)."""
    if quant.lower() == "f32":
        return f32
    llama_cpp = _llama_cpp()
    out = f32.with_name(f32.name.removesuffix("-f32.gguf") + f"-{quant.lower()}.gguf")
    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(llama_cpp, quant)
    params.nthread = threads
    partial = out.with_suffix(".partial")
    # llama-cpp-python forwards llama.cpp's log to this logger, and maps ggml's current log levels one step too
    # high: INFO arrives as WARNING. Quantizing logs every tensor (and every k-quant fallback), so mute it here.
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    t0 = time.perf_counter()
    try:
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(partial).encode(), params)
    finally:
        log.setLevel(level)
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise SystemExit(f"llama_model_quantize({f32.name} -> {quant}) returned {rc}")
    partial.rename(out)
    print(
        f"quantized {quant} -> {out.name} in {time.perf_counter() - t0:.1f} s, {out.stat().st_size / 1e6:.0f} MB: "
        f"tensors {tensor_types(out)}",
        file=sys.stderr,
    )
    return out


def _llama(path: Path, threads: int, n_ctx: int, logits_all: bool) -> Any:
    llama_cpp = _llama_cpp()
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
        logits_all=logits_all, verbose=False,
    )  # fmt: skip


def _last_logits(llm: Any) -> NDArray[np.float32]:
    """The logits row of the last token evaluated (the context keeps it with or without ``logits_all``)."""
    llama_cpp = _llama_cpp()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def _is_eog(llm: Any, token: int) -> bool:
    llama_cpp = _llama_cpp()
    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token))


def check_tokens(path: Path, refs: Sequence[Reference]) -> list[str]:
    """What differs between the ids both runtimes are fed and llama.cpp's own reading of the same text."""
    llm = _llama(path, 1, 256, logits_all=False)
    notes = []
    for i, ref in enumerate(refs):
        if not ref.prompt_text:
            continue
        own = llm.tokenize(ref.prompt_text.encode(), add_bos=False, special=True)
        if list(own) != ref.prompt_ids:
            notes.append(
                f"prompt {i}: llama.cpp tokenizes the text to {len(own)} ids, the source to {len(ref.prompt_ids)}"
            )
    llama_cpp = _llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    notes.append(f"n_vocab {llm.n_vocab()}, eos {llm.token_eos()}, end-of-generation ids {eog}")
    notes.append(f"GGUF add_bos {bool(llama_cpp.llama_vocab_get_add_bos(vocab))} (unused: ids are fed)")
    return notes


def score_gguf(path: Path, refs: Sequence[Reference], threads: int) -> Fidelity:
    """Teacher-force prompt ids + the reference answer (prompt in one batch, then one token at a time, as the
    ONNX side does), then a greedy answer that stops after an end-of-generation token or 32 tokens."""
    n_ctx = max(len(r.prompt_ids) + max(len(r.answer_ids), NEW_TOKENS) for r in refs) + 8
    llm = _llama(path, threads, n_ctx, logits_all=True)
    deployed, answers = [], []
    for ref in refs:
        if llm.n_vocab() != ref.logprobs.shape[-1]:
            raise SystemExit(f"{path.name}: vocabulary {llm.n_vocab()} != source {ref.logprobs.shape[-1]}")
        llm.reset()
        llm.eval(ref.prompt_ids)
        for token in ref.answer_ids[:-1]:
            llm.eval([token])
        start = len(ref.prompt_ids) - 1
        rows = np.array(llm.scores[start : start + len(ref.answer_ids)], dtype=np.float32)
        deployed.append(_log_softmax(rows))
        llm.reset()
        llm.eval(ref.prompt_ids)
        answer: list[int] = []
        while len(answer) < NEW_TOKENS:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            answer.append(token)
            if _is_eog(llm, token) or len(answer) == NEW_TOKENS:
                break
            llm.eval([token])
        answers.append(answer)
    return _compare(refs, deployed, answers)


def gguf_timer(path: Path, threads: int, prompt_tokens: int = SPEED_PROMPT_TOKENS) -> Callable[[], Timing]:
    """TTFT = prefill of the speed prompt + picking the first token; decode tok/s over the next 31 tokens."""
    llm = _llama(path, threads, prompt_tokens + NEW_TOKENS + 8, logits_all=False)
    ids = speed_ids(prompt_tokens)

    def once() -> Timing:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(_last_logits(llm)))
        t1 = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            llm.eval([token])
            token = int(np.argmax(_last_logits(llm)))
        t2 = time.perf_counter()
        return t1 - t0, (NEW_TOKENS - 1) / (t2 - t1)

    return once


def interleaved(timers: dict[str, Callable[[], Timing]], rounds: int) -> dict[str, list[Timing]]:
    """Every build loaded at once and timed in turn, round after round (after one warm-up round), so a change
    in the machine's load falls on all of them alike; a build's rounds pair with every other build's."""
    from pytest_slmdeploy.stats import interleaved as in_turn

    samples = in_turn(list(timers.values()), min_rounds=rounds + 1, max_rounds=rounds + 1, budget_s=float("inf"))
    return {name: timings[1:] for name, timings in zip(timers, samples, strict=True)}


def ratio(timings: dict[str, list[Timing]], build: str, reference: str) -> tuple[float, float, float]:
    """Decode speed of ``build`` over ``reference`` round by round: median, min and max."""
    ratios = [a[1] / b[1] for a, b in zip(timings[build], timings[reference], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


# ---------------------------------------------------------------- report


@dataclass
class Row:
    build: str
    runtime: str
    size_mb: float
    fidelity: Fidelity
    decode_tps: float | None
    ttft_ms: float | None
    path: str = ""
    decode_vs_reference: tuple[float, float, float] | None = None  # median, min, max of the paired rounds


def table(rows: Sequence[Row], reference: str = "-") -> list[str]:
    lines = [
        f"| build | runtime | size MB | answers identical | exact top-1 | mean KLD | decode tok/s | TTFT ms "
        f"| decode x {reference} (min-max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r.fidelity
        speed = "-" if r.decode_tps is None else f"{r.decode_tps:.0f}"
        ttft = "-" if r.ttft_ms is None else f"{r.ttft_ms:.0f}"
        vs = "-" if r.decode_vs_reference is None else "{:.2f} ({:.2f}-{:.2f})".format(*r.decode_vs_reference)
        lines.append(
            f"| {r.build} | {r.runtime} | {r.size_mb:.0f} | {f.answers_identical}/{f.answers_total} "
            f"| {f.exact_top1:.1%} | {f.mean_kld:.3g} | {speed} | {ttft} | {vs} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--onnx", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--gguf", action="append", default=[], metavar="NAME=FILE", help="an existing GGUF file")
    parser.add_argument(
        "--llama-cpp-quants", default="", metavar="q8_0,q4_k_m,...",
        help="convert SOURCE to F32 GGUF and quantize to these llama.cpp types (f32 = the conversion itself)",
    )  # fmt: skip
    parser.add_argument("--convert-script", type=Path, help=f"convert_hf_to_gguf.py (default: found under {PEER_DIR})")
    parser.add_argument("--work-dir", type=Path, default=PEER_DIR / "gguf", help="cache of converted GGUF files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--rounds", type=int, default=SPEED_ROUNDS, help="timed interleaved rounds per build")
    parser.add_argument("--reference", help="the build decode speeds are compared with (default: the first GGUF)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    ggufs: list[tuple[str, Path]] = []
    quants = [q.strip() for q in args.llama_cpp_quants.split(",") if q.strip()]
    if quants:
        f32 = convert_f32(args.source, find_convert_script(args.convert_script), args.work_dir)
        ggufs.extend((q.lower(), quantize(f32, q, args.threads)) for q in quants)
    for spec in args.gguf:
        name, _, file = spec.partition("=")
        ggufs.append((name, Path(file)))
    refs = references(args.source)
    if ggufs:
        for note in check_tokens(ggufs[0][1], refs):
            print(f"llama.cpp tokens: {note}", file=sys.stderr)
    rows: list[Row] = []
    timers: dict[str, Callable[[], Callable[[], Timing]]] = {}
    for spec in args.onnx:
        name, _, folder = spec.partition("=")
        path = Path(folder)
        print(f"scoring {name}", file=sys.stderr)
        rows.append(Row(name, "ort-genai", onnx_bytes(path) / 1e6, score_onnx(path, refs, args.threads), None, None,
                        str(path)))  # fmt: skip
        timers[name] = lambda path=path: onnx_timer(path, args.threads)  # type: ignore[misc]
    for name, gguf in ggufs:
        print(f"scoring {name}", file=sys.stderr)
        rows.append(Row(name, "llama.cpp", gguf.stat().st_size / 1e6, score_gguf(gguf, refs, args.threads), None,
                        None, str(gguf)))  # fmt: skip
        timers[name] = lambda gguf=gguf: gguf_timer(gguf, args.threads)  # type: ignore[misc]
    reference = args.reference or (ggufs[0][0] if ggufs else rows[0].build if rows else "-")
    if not args.no_speed and rows:
        print(f"timing {len(timers)} builds, {args.rounds} interleaved rounds", file=sys.stderr)
        timings = interleaved({name: make() for name, make in timers.items()}, args.rounds)
        for row in rows:
            row.ttft_ms = statistics.median(t[0] for t in timings[row.build]) * 1000
            row.decode_tps = statistics.median(t[1] for t in timings[row.build])
            if reference in timings:
                row.decode_vs_reference = ratio(timings, row.build, reference)
    print("\n".join(table(rows, reference)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
