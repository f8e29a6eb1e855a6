"""Fidelity to the source model: the deployed model scored against the fine-tuned model it was built from.

The source model (transformers, fp32, CPU) answers each prompt greedily; its
answer tokens and next-token distributions are the references. The installed
ONNX Runtime GenAI model is then teacher-forced on the same tokens, as
llama.cpp's ``llama-perplexity --kl-divergence`` does, and compared position by
position: top-1 agreement, KL divergence, and the reference tokens' likelihood.

The KL divergence is exact, over the whole vocabulary: the references keep the
source's full log-probabilities at every answer position (float16). A summary
of the source's distribution (its top k plus one bucket for the rest) gives
only a lower bound, and on flat distributions a model unrelated to the source
scored 0.004 on it against a true 0.36 (issue 21, item 4).

References are computed once per (source fingerprint, prompts, answer length,
schema) and kept in ``<cache>/references/``: a warm run reads them with numpy
(the log-probabilities memory-mapped) and never imports torch or transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pytest_slmdeploy.errors import SlmDeployError, describe
from pytest_slmdeploy.measure import threads_free_now, torch_threads
from pytest_slmdeploy.stats import Verdict, Z, wilson_interval

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

SCHEMA = 2  # 2: full-vocabulary log-probabilities (schema 1's top-k + rest bucket only bounded the KLD)
DEFAULT_TOP_K = 64
TIE_MARGIN = 0.02  # top-1 agreement counts a token within this much source probability of the top one
REFERENCES_DIR = "references"
ROWS_SUFFIX = ".logp16"  # beside <key>.npz: (positions, vocab) float16 log-probabilities, raw, memory-mapped

# Plain general-knowledge instructions fidelity is also scored on (after the domain cases and the suite's generic
# prompts), so that a run without a case file rests on enough answer tokens: 64 prompts x 32 tokens give a model
# 3 points under the 95% top-1 limit a failing verdict at least 90% of the time (tests/test_fidelity.py sizes it).
# They need not be answerable by a tiny test model: fidelity teacher-forces the source's own answers. None is a
# calibration instruction of the int4 recipe (recipes.CALIBRATION_INSTRUCTIONS): scored out of sample.
FIDELITY_PROMPTS = (
    "Explain how a refrigerator keeps food cold.",
    "What is the capital of Australia, and why was it chosen?",
    "Describe how bees make honey.",
    "Why is the sky blue?",
    "Explain what photosynthesis is.",
    "How does a rainbow form?",
    "What is the difference between a lake and a sea?",
    "Describe the life cycle of a butterfly.",
    "Explain how a compass works.",
    "What were the main causes of the First World War?",
    "Summarize the story of Romeo and Juliet.",
    "How do volcanoes erupt?",
    "What is the role of the heart in the human body?",
    "Explain what gravity is to a ten-year-old.",
    "What is a prime number? Give three examples.",
    "Describe how bread is made.",
    "Why do we have time zones?",
    "What is the difference between a democracy and a monarchy?",
    "Explain how a battery stores energy.",
    "Describe the Great Wall of China.",
    "What do plants need to grow?",
    "How does the internet send a message from one computer to another?",
    "Explain what an atom is made of.",
    "What are the three states of matter?",
    "Describe the job of a firefighter.",
    "Why do cats purr?",
    "Explain how the Moon causes the tides.",
    "What is the tallest mountain in the world, and how tall is it?",
    "Give advice to someone starting to learn the guitar.",
    "Explain what a budget is and why it helps.",
    "Describe the rules of football (soccer) in a few sentences.",
    "What is the difference between an ocean current and a wave?",
    "How does a camera capture a photograph?",
    "Explain why ice floats on water.",
    "Why did the ancient Egyptians build the pyramids?",
    "Describe how a bill becomes a law in a parliament.",
    "What is a fraction? Explain it with a pizza.",
    "Write a short story about a lost umbrella.",
    "Explain what recycling is and why it matters.",
    "How do fish breathe underwater?",
    "What is the speed of light, and why does it matter?",
    "Describe a typical day of an astronaut on a space station.",
    "Explain the difference between a meteor and a comet.",
    "What are the main parts of a flower?",
    "How does a thermometer measure temperature?",
    "Give four tips for writing a good essay.",
    "Explain what the scale of a map means.",
    "Why do some animals hibernate in winter?",
    "What is the Renaissance known for?",
    "Describe how a car engine turns fuel into motion.",
    "Explain what an eclipse is.",
    "What makes a good friend?",
    "How are mountains formed?",
    "Explain the difference between renewable and non-renewable energy.",
    "What does the stomach do during digestion?",
    "Describe Paris to someone who has never been there.",
    "Explain what a spreadsheet is used for.",
    "How do migrating birds find their way?",
    "Describe the deep ocean and the animals that live there.",
    "Explain how a lighthouse helps ships.",
    "What is an election, and how are the votes counted?",
    "Describe how cheese is made.",
    "Explain what DNA is in simple terms.",
    "What are the benefits of reading books?",
)

Message = Mapping[str, str]
Prompt = str | Sequence[Message]
Progress = Callable[[str], None]


class FidelityError(SlmDeployError):
    """References cannot be computed, or the deployed model cannot be scored against them."""


def _messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def _label(messages: Sequence[Message]) -> str:
    """What a person calls the prompt: the last user turn."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def references_key(source_fingerprint: str, prompts: Sequence[Prompt], *, max_new_tokens: int, top_k: int) -> str:
    """What references depend on: the source's content, the prompts, the answer length and this module's schema."""
    payload = {
        "schema": SCHEMA,
        "source": source_fingerprint,
        "prompts": [_messages(p) for p in prompts],
        "max_new_tokens": max_new_tokens,
        "top_k": top_k,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, eq=False)
class References:
    """The source model's greedy answers and next-token distributions.

    At each answer position the whole distribution is kept as float16 log-probabilities (``logprobs``: 2 bytes
    per vocabulary entry and position; 297 KiB a position for a 151,936-token vocabulary), so the KL divergence
    is exact. The ``top_k`` most likely tokens are also kept apart, for the near-tie rule and the messages.
    """

    key: str
    source_fingerprint: str
    max_new_tokens: int
    top_k: int
    messages: tuple[tuple[dict[str, str], ...], ...]
    prompt_ids: tuple[tuple[int, ...], ...]
    answer_ids: tuple[tuple[int, ...], ...]  # greedy, ending with an end token unless max_new_tokens cut it
    answer_texts: tuple[str, ...]
    eos_token_ids: tuple[int, ...]
    topk_ids: NDArray[np.int32]  # (positions, top_k): position p of prompt i is offsets[i] + p
    topk_logprobs: NDArray[np.float32]  # (positions, top_k), most likely first
    logprobs: NDArray[np.float16]  # (positions, vocab): every token's log-probability (memory-mapped when loaded)
    token_logprob: NDArray[np.float32]  # (positions,): the reference token's log-probability
    compute_seconds: float  # what computing them took, when they were computed
    path: Path | None = None
    loaded: bool = False  # read from the cache rather than computed by this call

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(_label(m) for m in self.messages)

    @property
    def offsets(self) -> tuple[int, ...]:
        starts = [0]
        for answer in self.answer_ids:
            starts.append(starts[-1] + len(answer))
        return tuple(starts)

    @property
    def stopped(self) -> tuple[bool, ...]:
        """Whether each answer ended with an end token (rather than at ``max_new_tokens``)."""
        return tuple(bool(a) and a[-1] in self.eos_token_ids for a in self.answer_ids)

    def save(self, path: Path) -> Path:
        """Write them to ``path`` (npz) and the log-probabilities beside it (:func:`rows_path`), each atomically:
        a temporary file, then ``os.replace``; the npz last, so that its presence means both are complete."""
        import numpy as np

        rows = rows_path(path)
        if Path(getattr(self.logprobs, "filename", None) or "") != rows:  # not already written there
            _write_atomically(rows, lambda fh: fh.write(np.ascontiguousarray(self.logprobs, dtype=np.float16).data))
        meta = {
            "schema": SCHEMA,
            "key": self.key,
            "source_fingerprint": self.source_fingerprint,
            "max_new_tokens": self.max_new_tokens,
            "top_k": self.top_k,
            "messages": [list(m) for m in self.messages],
            "answer_texts": list(self.answer_texts),
            "eos_token_ids": list(self.eos_token_ids),
            "compute_seconds": self.compute_seconds,
            "vocab": int(self.logprobs.shape[1]),
        }
        _write_atomically(
            path,
            lambda fh: np.savez_compressed(
                fh,
                meta=np.array(json.dumps(meta)),
                prompt_ids=_flat([*self.prompt_ids]),
                prompt_lengths=np.array([len(p) for p in self.prompt_ids], dtype=np.int64),
                answer_ids=_flat([*self.answer_ids]),
                answer_lengths=np.array([len(a) for a in self.answer_ids], dtype=np.int64),
                topk_ids=self.topk_ids,
                topk_logprobs=self.topk_logprobs,
                token_logprob=self.token_logprob,
            ),
        )
        return path

    @classmethod
    def load(cls, path: Path) -> References:
        """Read references written by :meth:`save` (numpy only)."""
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("schema") != SCHEMA:
                raise FidelityError(f"{path}: references of schema {meta.get('schema')}, expected {SCHEMA}")
            prompt_ids = _split(data["prompt_ids"], data["prompt_lengths"])
            answer_ids = _split(data["answer_ids"], data["answer_lengths"])
            arrays = {k: data[k].copy() for k in ("topk_ids", "topk_logprobs", "token_logprob")}
        shape = (int(arrays["topk_ids"].shape[0]), int(meta["vocab"]))
        rows = rows_path(path)
        if not rows.is_file() or rows.stat().st_size != 2 * shape[0] * shape[1]:
            raise FidelityError(f"{rows}: missing or incomplete, expected {shape[0]} x {shape[1]} log-probabilities")
        return cls(
            key=meta["key"],
            source_fingerprint=meta["source_fingerprint"],
            max_new_tokens=int(meta["max_new_tokens"]),
            top_k=int(meta["top_k"]),
            messages=tuple(tuple(dict(m) for m in ms) for ms in meta["messages"]),
            prompt_ids=prompt_ids,
            answer_ids=answer_ids,
            answer_texts=tuple(meta["answer_texts"]),
            eos_token_ids=tuple(int(t) for t in meta["eos_token_ids"]),
            compute_seconds=float(meta["compute_seconds"]),
            path=path,
            loaded=True,
            logprobs=np.memmap(rows, dtype=np.float16, mode="r", shape=shape),
            **arrays,
        )


def _complete(path: Path) -> References | None:
    """The references at ``path``, or None when they are not there or their log-probabilities are not whole."""
    if not path.is_file():
        return None
    try:
        return References.load(path)
    except FidelityError:  # the log-probabilities removed (to free disk) or cut short: compute them again
        return None


def rows_path(path: Path) -> Path:
    """Where the log-probabilities of the references at ``path`` (``<key>.npz``) are kept."""
    return path.with_suffix(ROWS_SUFFIX)


def _write_atomically(path: Path, write: Callable[[Any], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _flat(rows: list[tuple[int, ...]]) -> NDArray[np.int64]:
    import numpy as np

    return np.array([t for row in rows for t in row], dtype=np.int64)


def _split(flat: NDArray[Any], lengths: NDArray[Any]) -> tuple[tuple[int, ...], ...]:
    out, start = [], 0
    for n in lengths.tolist():
        out.append(tuple(int(t) for t in flat[start : start + n].tolist()))
        start += n
    return tuple(out)


def prompt_set(
    domain: Sequence[Sequence[Message]],
    generic: Sequence[str],
    *,
    limit: int,
    builtin: Sequence[str] = FIDELITY_PROMPTS,
) -> list[Prompt]:
    """The prompts fidelity is scored on: the domain conversations first (they are what was fine-tuned), then the
    generic prompts, then the built-in fidelity prompts, without repeats, at most ``limit``."""
    chosen: list[Prompt] = []
    seen: set[str] = set()
    candidates: list[Prompt] = [[dict(m) for m in conversation] for conversation in domain]
    for prompt in [*candidates, *generic, *builtin]:
        key = json.dumps(_messages(prompt), sort_keys=True)
        if key not in seen:
            seen.add(key)
            chosen.append(prompt)
    return chosen[:limit]


def references_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / REFERENCES_DIR / f"{key[:32]}.npz"


def compute_references(
    source_dir: str | Path,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    cache_dir: str | Path | None = None,
    top_k: int = DEFAULT_TOP_K,
    trust_remote_code: bool = False,
    progress: Progress = lambda message: None,
) -> References:
    """The source model's references for ``prompts``, from ``<cache_dir>/references/`` when already computed.

    Computing them loads the source in transformers (fp32, CPU; its own code only with ``trust_remote_code``).
    Each prompt is rendered by the model's own chat template with the generation prompt added and tokenized
    as ``apply_chat_template`` does (``add_special_tokens=False``): the template alone decides whether a BOS
    is there, so there is never a second one. The answer is greedy on the raw logits (no repetition penalty
    or other search settings) until an end token of ``generation_config`` or ``max_new_tokens``.
    """
    import numpy as np

    from pytest_slmdeploy.source import fingerprint

    if max_new_tokens < 1:
        raise FidelityError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompts:
        raise FidelityError("no prompts to compute references for")
    source = Path(source_dir)
    cache = Path(cache_dir) if cache_dir is not None else None
    fp = fingerprint(source, stat_cache_dir=cache)
    key = references_key(fp, prompts, max_new_tokens=max_new_tokens, top_k=top_k)
    args = (source, prompts, fp, key, max_new_tokens, top_k, trust_remote_code, progress)
    if cache is None:
        with tempfile.TemporaryFile() as sink:
            fields, vocab = _compute(*args, sink)
            sink.seek(0)
            logprobs = np.fromfile(sink, dtype=np.float16).reshape(-1, vocab)
        return References(**fields, logprobs=logprobs)
    path = references_path(cache, key)
    if (found := _complete(path)) is not None:
        return found
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = rows_path(path)
    with FileLock(str(path) + ".lock"):
        if (found := _complete(path)) is not None:  # another process computed them while we waited
            return found
        # The log-probabilities go to disk row by row as they are computed: at 297 KiB a position for a
        # 151,936-token vocabulary they need not all sit in memory.
        fd, tmp = tempfile.mkstemp(prefix=f".{rows.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as sink:
                fields, vocab = _compute(*args, sink)
            os.replace(tmp, rows)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        positions = int(fields["topk_ids"].shape[0])
        logprobs = np.memmap(rows, dtype=np.float16, mode="r", shape=(positions, vocab))
        refs = References(**fields, logprobs=logprobs)
        refs.save(path)
    return dataclasses.replace(refs, path=path)


def _compute(
    source: Path,
    prompts: Sequence[Prompt],
    fp: str,
    key: str,
    max_new_tokens: int,
    top_k: int,
    trust_remote_code: bool,
    progress: Progress,
    sink: BinaryIO,
) -> tuple[dict[str, Any], int]:
    """The references' fields but the log-probabilities, which go to ``sink`` (float16 rows), and the vocabulary."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the run shows its own progress line
    start = time.perf_counter()
    threads, on = threads_free_now()  # the references take minutes on a real model
    progress(f"computing fidelity references with the source model ({len(prompts)} prompts) on {on}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises anything on a folder it cannot read
        raise FidelityError(f"the source model {source} cannot be loaded in transformers: {describe(exc)}") from None
    model.eval()
    eos = _eos_ids(model, tokenizer)
    # Greedy on the raw logits, without the sampling settings or repetition penalty of the model's own
    # generation_config: generate() fills every unset value from model.generation_config, so blank that too.
    model.generation_config = GenerationConfig()
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(eos),
        pad_token_id=min(eos),
        output_logits=True,
        return_dict_in_generate=True,
    )
    all_messages, prompt_rows, answer_rows, texts = [], [], [], []
    top_ids: list[Any] = []
    top_lps: list[Any] = []
    vocab = 0
    tokens_lp: list[float] = []
    with torch.inference_mode(), torch_threads(threads):
        for prompt in prompts:
            messages = _messages(prompt)
            try:
                ids = [int(t) for t in _chat_ids(tokenizer, messages)]
            except Exception as exc:  # the template's own raise_exception(), or a Jinja error
                raise FidelityError(
                    f"the source's chat template refused {_label(messages)!r}: {describe(exc)}"
                ) from None
            out = model.generate(
                input_ids=torch.tensor([ids], dtype=torch.long),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                generation_config=greedy,
            )
            answer = [int(t) for t in out.sequences[0, len(ids) :]]
            for token, raw in zip(answer, out.logits, strict=True):
                logp = torch.log_softmax(raw[0].double(), dim=-1)
                k = min(top_k, logp.numel())
                values, indices = torch.topk(logp, k)
                top_ids.append(indices.numpy().astype(np.int32))
                top_lps.append(values.numpy().astype(np.float32))
                sink.write(logp.numpy().astype(np.float16).tobytes())
                vocab = logp.numel()
                tokens_lp.append(float(logp[token]))
            all_messages.append(tuple(messages))
            prompt_rows.append(tuple(ids))
            answer_rows.append(tuple(answer))
            body = answer[:-1] if answer and answer[-1] in eos else answer
            texts.append(str(tokenizer.decode(body, skip_special_tokens=True)))
    seconds = time.perf_counter() - start
    progress(f"fidelity references computed in {seconds:.1f}s")
    fields = {
        "key": key,
        "source_fingerprint": fp,
        "max_new_tokens": max_new_tokens,
        "top_k": top_k,
        "messages": tuple(all_messages),
        "prompt_ids": tuple(prompt_rows),
        "answer_ids": tuple(answer_rows),
        "answer_texts": tuple(texts),
        "eos_token_ids": tuple(sorted(eos)),
        "topk_ids": np.stack(top_ids),
        "topk_logprobs": np.stack(top_lps),
        "token_logprob": np.array(tokens_lp, dtype=np.float32),
        "compute_seconds": seconds,
    }
    return fields, vocab


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """``apply_chat_template(tokenize=True)``: the rendered text tokenized with ``add_special_tokens=False``."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    if isinstance(ids, Mapping):  # a BatchEncoding despite return_dict=False (older transformers)
        ids = ids["input_ids"]
    return list(ids)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The end tokens greedy decoding stops at: generation_config's, else config's, else the tokenizer's."""
    for value in (
        getattr(model.generation_config, "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if value is not None:
            return {int(v) for v in (value if isinstance(value, list | tuple) else [value])}
    raise FidelityError("the source model names no end token (generation_config.json eos_token_id)")


@dataclass(frozen=True)
class PromptFidelity:
    """One prompt's figures: the deployed model teacher-forced on the reference answer."""

    index: int
    prompt: str
    reference_answer: str
    positions: int
    agreed: int  # positions whose deployed top-1 token is the reference token, or a near tie of it (TIE_MARGIN)
    first_divergence: int | None  # first position that disagrees (None: the answer is identical)
    mean_kld: float
    max_kld: float
    reference_nll: float  # summed over the answer's tokens
    deployed_nll: float
    runtime_prompt_match: bool | None = None  # the deployed tokenizer renders the same prompt ids (None: unknown)
    exact: int = 0  # positions whose deployed top-1 token is exactly the reference token
    runtime_text: str | None = None  # the deployed tokenizer's text for the reference answer's ids (None: unknown)

    @property
    def text_match(self) -> bool | None:
        """The deployed pipeline writes the reference answer's tokens as the source's tokenizer does (None:
        unknown). Same tokens can give other text: a leading lone "▁" is two spaces in ONNX Runtime GenAI's
        decoder and one in transformers' for a Mistral-family tokenizer."""
        return None if self.runtime_text is None else self.runtime_text == self.reference_answer

    @property
    def identical(self) -> bool:
        """Greedy decoding of the deployed model gives the reference answer, token for token."""
        return self.first_divergence is None


@dataclass(frozen=True)
class FidelityLimits:
    """What the deployed model must keep of the source (see :meth:`violations`).

    Defaults: at most 0.1 nats of mean KLD per answer token, and 95% of the source's top-1 tokens kept. Measured
    on the tiny FAQ model: healthy INT4 KLD 4e-5 and 100% top-1 (12/12 answers identical); with outlier
    channels (S=150) the GPTQ INT4 recipe KLD 0.14 (S=40 broke both limits of the former RTN INT4: KLD 0.33,
    90%). On SmolLM2-135M-Instruct, a real model: int8 KLD 0.005, int4 0.13-0.2. For scale, llama.cpp's good 4-bit
    quantizations of 7-8B models measure mean KLD 0.03-0.05 and 90-95% "same top p" on running text; a
    model's own greedy answers are its confident tokens, where agreement runs higher. Answers identical,
    the maximum KLD and the perplexity ratio are reported but not gated by default: one different token in
    a long answer, or one uncertain position, is not a drift.
    """

    min_top1_agreement: float = 0.95
    max_mean_kld: float = 0.1
    min_identical_share: float = 0.0

    @classmethod
    def of(cls, limits: Mapping[str, float]) -> FidelityLimits:
        """From the checklist limits (``slm_fidelity_*`` ini keys and marker keywords)."""
        return cls(
            min_top1_agreement=limits["fidelity_min_top1_agreement"],
            max_mean_kld=limits["fidelity_max_mean_kld"],
            min_identical_share=limits["fidelity_min_identical"],
        )

    def checks(self, result: FidelityResult) -> list[tuple[Verdict, str]]:
        """Each limit the result does not pass, with its verdict: ``fail`` when the figure's 95% interval lies
        entirely past the limit, ``inconclusive`` when it straddles it (this run's evidence cannot decide)."""
        found: list[tuple[Verdict, str]] = []
        low, high = result.top1_interval()
        if low < self.min_top1_agreement:
            what = f"top-1 agreement {result.top1_agreement:.1%} (95% interval {low:.1%}-{high:.1%})"
            found.append(
                ("fail", f"{what} < {self.min_top1_agreement:.1%}")
                if high < self.min_top1_agreement
                else ("inconclusive", f"{what} straddles {self.min_top1_agreement:.1%}")
            )
        low, high = result.kld_interval()
        if high > self.max_mean_kld:
            what = f"mean KLD {result.mean_kld:.3g} (95% interval {low:.3g}-{high:.3g})"
            found.append(
                ("fail", f"{what} > {self.max_mean_kld:g}")
                if low > self.max_mean_kld
                else ("inconclusive", f"{what} straddles {self.max_mean_kld:g}")
            )
        if mismatched := [p for p in result.prompts if p.text_match is False]:
            first = mismatched[0]
            found.append(
                (
                    "fail",
                    f"deployed text differs from the source's for the same tokens in {len(mismatched)}/"
                    f"{result.total} answers (e.g. {first.runtime_text!r} vs {first.reference_answer!r})",
                )
            )
        if result.identical_share < self.min_identical_share:
            found.append(
                (
                    "fail",
                    f"answers identical {result.answers_identical}/{result.total} "
                    f"({result.identical_share:.0%}) < {self.min_identical_share:.0%}",
                )
            )
        return found

    def violations(self, result: FidelityResult) -> tuple[str, ...]:
        """One phrase per limit the result decidedly breaks. An undecided limit is not one (the ladder rejects a
        rung on those too): see :meth:`checks` and :meth:`verdict`."""
        return tuple(phrase for verdict, phrase in self.checks(result) if verdict == "fail")

    def verdict(self, result: FidelityResult) -> Verdict:
        """``fail`` when a limit is decidedly broken, else ``inconclusive`` when one is undecided, else ``pass``."""
        verdicts = {verdict for verdict, _ in self.checks(result)}
        return "fail" if "fail" in verdicts else "inconclusive" if verdicts else "pass"

    def judge(self, result: FidelityResult, deployed_answers: Mapping[int, str] | None = None) -> Judgement:
        """The verdict with its explanation, for the ``slm_verdict`` fixture (like a timing comparison)."""
        return Judgement(result, self, deployed_answers)


@dataclass(frozen=True)
class FidelityResult:
    """The deployed model against the references, over all prompts."""

    prompts: tuple[PromptFidelity, ...]
    top1_agreement: float  # share of all answer positions (near ties count: see TIE_MARGIN)
    mean_kld: float  # over all answer positions, each KL(source || deployed) over the whole vocabulary
    max_kld: float
    perplexity_ratio: float  # exp(mean NLL deployed - mean NLL source) of the reference tokens
    score_seconds: float
    references_key: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    top1_exact: float = 0.0  # the strict share, llama.cpp's "same top p"

    @property
    def answers_identical(self) -> int:
        return sum(p.identical for p in self.prompts)

    @property
    def total(self) -> int:
        return len(self.prompts)

    @property
    def identical_share(self) -> float:
        return self.answers_identical / self.total if self.total else 1.0

    @property
    def positions(self) -> int:
        return sum(p.positions for p in self.prompts)

    def worst(self, n: int = 3) -> list[PromptFidelity]:
        """The ``n`` prompts with the highest mean KLD, worst first."""
        return sorted(self.prompts, key=lambda p: (-p.mean_kld, p.index))[:n]

    def top1_interval(self) -> tuple[float, float]:
        """95% interval of the top-1 agreement (:func:`agreement_interval`)."""
        return agreement_interval([p.agreed for p in self.prompts], [p.positions for p in self.prompts])[:2]

    def effective_positions(self) -> float:
        """How many independent positions the answers' correlated ones are worth (:func:`agreement_interval`)."""
        return agreement_interval([p.agreed for p in self.prompts], [p.positions for p in self.prompts])[2]

    def kld_interval(self) -> tuple[float, float]:
        """95% interval of the mean KLD (:func:`mean_interval`)."""
        return mean_interval([p.mean_kld * p.positions for p in self.prompts], [p.positions for p in self.prompts])

    def evidence(self) -> str:
        """What the figures rest on: prompts and teacher-forced tokens."""
        return f"{self.total} prompts, {self.positions} tokens"

    def summary(self) -> str:
        low, high = self.top1_interval()
        kld_low, kld_high = self.kld_interval()
        return (
            f"{self.evidence()} teacher-forced: answers identical {self.answers_identical}/{self.total}, "
            f"top-1 agreement {self.top1_agreement:.1%} (95% interval {low:.1%}-{high:.1%}, worth "
            f"{self.effective_positions():.0f} independent tokens; exact {self.top1_exact:.1%}), "
            f"mean KLD {self.mean_kld:.3g} (95% interval {kld_low:.3g}-{kld_high:.3g}), max KLD {self.max_kld:.3g}, "
            f"perplexity ratio {self.perplexity_ratio:.3f}"
        )

    def prompt_match(self) -> str:
        """How many prompts the deployed tokenizer and chat template turn into the source's very ids (the
        figures use the source's ids, so where they differ the deployed pipeline is not what was scored)."""
        known = [p.runtime_prompt_match for p in self.prompts if p.runtime_prompt_match is not None]
        return f"{sum(known)}/{len(known)}" if known else "unknown"

    def text_match(self) -> str:
        """How many answers the deployed tokenizer writes as the source's does, from the same token ids."""
        known = [p.text_match for p in self.prompts if p.text_match is not None]
        return f"{sum(known)}/{len(known)}" if known else "unknown"

    def passes(self, limits: FidelityLimits) -> bool:
        """Every limit decidedly kept (an undecided one is no pass)."""
        return limits.verdict(self) == "pass"

    def message(self, limits: FidelityLimits, deployed_answers: Mapping[int, str] | None = None, n: int = 3) -> str:
        """The verdict's message: limits broken or undecided, the figures with their evidence and intervals, and
        on a failure the worst prompts with both answers."""
        verdict = limits.verdict(self)
        broken = [phrase for v, phrase in limits.checks(self) if v == verdict]
        if verdict == "fail":
            head = f"the deployed model drifted from its source: {'; '.join(broken)}"
        elif verdict == "inconclusive":
            head = f"inconclusive: this run's evidence cannot decide fidelity to the source: {'; '.join(broken)}"
        else:
            head = "the deployed model is faithful to its source"
        lines = [f"{head} ({self.summary()})"]
        if verdict == "fail":
            lines.append("worst prompts (highest KLD):")
            for p in self.worst(n):
                where = "identical" if p.first_divergence is None else f"diverges at token {p.first_divergence}"
                lines.append(f"  {p.prompt!r}: KLD {p.mean_kld:.3g} (max {p.max_kld:.3g}), {where}")
                lines.append(f"    source:   {p.reference_answer!r}")
                if deployed_answers is not None and p.index in deployed_answers:
                    lines.append(f"    deployed: {deployed_answers[p.index]!r}")
        mismatched = [p.prompt for p in self.prompts if p.runtime_prompt_match is False]
        if mismatched:
            lines.append(
                f"note: the deployed tokenizer renders {len(mismatched)} prompt(s) to other token ids than the "
                f"source's (e.g. {mismatched[0]!r}); these figures use the source's ids"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class Judgement:
    """A fidelity result judged against its limits; read by the ``slm_verdict`` fixture as a timing comparison is
    (:class:`pytest_slmdeploy.stats.Judged`): a failure fails the test, an undecided verdict is reported as
    inconclusive."""

    result: FidelityResult
    limits: FidelityLimits
    deployed_answers: Mapping[int, str] | None = None

    @property
    def verdict(self) -> Verdict:
        return self.limits.verdict(self.result)

    def explain(self) -> str:
        return self.result.message(self.limits, self.deployed_answers)


def agreement_interval(agreed: Sequence[int], positions: Sequence[int], z: float = Z) -> tuple[float, float, float]:
    """(low, high, effective positions): a Wilson interval for the share ``sum(agreed) / sum(positions)`` whose
    sample size is the positions' effective number, ``n / deff``.

    Positions within one answer are not independent (a model that drifts on one prompt tends to drift on its
    next tokens too), so ``n`` positions tell less than ``n`` coin flips. The design effect ``deff`` is Kish's:
    the variance of the share estimated from the spread between prompts (the ratio estimator's linearised
    variance, prompts as clusters) over the variance the same share would have from independent positions; at
    least 1. With fewer than two prompts nothing tells the spread between prompts: one position per prompt.
    Wilson's interval, unlike the normal one, stays inside [0, 1] and is not empty at 100% agreement.
    """
    k, n, hits = len(positions), float(sum(positions)), float(sum(agreed))
    if n <= 0:
        return 0.0, 1.0, 0.0
    share = hits / n
    if k < 2:
        effective = float(k)
    else:
        between = k / (k - 1) * sum((a - share * m) ** 2 for a, m in zip(agreed, positions, strict=True)) / n**2
        independent = share * (1 - share) / n
        deff = max(1.0, between / independent) if independent > 0 else 1.0
        effective = n / deff
    return (*wilson_interval(share, effective, z), effective)


def mean_interval(sums: Sequence[float], positions: Sequence[int], z: float = Z) -> tuple[float, float]:
    """Normal 95% interval of a per-position mean ``sum(sums) / sum(positions)`` (the mean KLD), its variance
    estimated from the spread between prompts (prompts as clusters, as :func:`agreement_interval`). With fewer
    than two prompts the spread is unknown: the interval is unbounded above."""
    k, n = len(positions), float(sum(positions))
    if n <= 0 or k < 2:
        return 0.0, math.inf
    mean = sum(sums) / n
    variance = k / (k - 1) * sum((s - mean * m) ** 2 for s, m in zip(sums, positions, strict=True)) / n**2
    half = z * math.sqrt(variance)
    return max(0.0, mean - half), mean + half


def _load_model(model_dir: Path, threads: int | None) -> Any:
    from pytest_slmdeploy.runtime.ortgenai import load_native

    if not (model_dir / "genai_config.json").is_file():
        raise FidelityError(f"{model_dir} holds no genai_config.json: not an ONNX Runtime GenAI model")
    try:
        return load_native(model_dir, threads)
    except Exception as exc:  # the native library raises plain RuntimeError
        raise FidelityError(f"ONNX Runtime GenAI cannot load {model_dir}: {describe(exc)}") from None


def _generator(og: Any, model: Any, max_length: int) -> Any:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    return og.Generator(model, params)


def _last_logits(generator: Any) -> NDArray[np.float64]:
    import numpy as np

    logits: NDArray[np.float32] = np.asarray(generator.get_logits(), dtype=np.float32)
    row: NDArray[np.float64] = logits.reshape(-1, logits.shape[-1])[-1].astype(np.float64)
    return row


def score(
    model_dir: str | Path,
    references: References,
    *,
    progress: Progress = lambda message: None,
    threads: int | None = None,
    model: Any = None,
) -> FidelityResult:
    """Teacher-force the installed model on the reference tokens and compare it with the source, position by position.

    For each prompt: append the prompt ids, read the logits, then append the reference answer one token at a
    time, reading the logits after each. KLD(source || deployed) is taken over the whole vocabulary.
    One token at a time, because that is how the deployed model answers: in one multi-token pass the answer's
    positions would run the prefill kernels instead (int8 activations quantized per tensor over the whole
    sequence), which moved the 0.5B-shaped model's figures by up to 1e-3 relative. ``model``: the
    ``onnxruntime_genai.Model`` of ``model_dir`` already loaded (the session's), else it is loaded here.
    """
    import numpy as np
    import onnxruntime_genai as og

    start = time.perf_counter()
    folder = Path(model_dir)
    if model is None:
        model = _load_model(folder, threads)
    tokenizer = og.Tokenizer(model)
    rows: list[PromptFidelity] = []
    progress(f"scoring fidelity on {len(references.answer_ids)} prompts")
    for i, (prompt_ids, answer) in enumerate(zip(references.prompt_ids, references.answer_ids, strict=True)):
        generator = _generator(og, model, len(prompt_ids) + len(answer))
        try:
            generator.append_tokens(list(prompt_ids))
            logits = [_last_logits(generator)]
            for token in answer[:-1]:
                generator.append_tokens([token])
                logits.append(_last_logits(generator))
        except Exception as exc:  # the native library raises plain RuntimeError
            raise FidelityError(
                f"{folder}: teacher forcing failed on {references.prompts[i]!r}: {describe(exc)}"
            ) from None
        finally:
            del generator
        stacked = np.stack(logits)
        if stacked.shape[1] < references.logprobs.shape[1]:
            raise FidelityError(
                f"{folder}: vocabulary of {stacked.shape[1]} tokens, but the source's has "
                f"{references.logprobs.shape[1]}: the deployed model is not built from this source"
            )
        match = _runtime_prompt_match(tokenizer, references.messages[i], prompt_ids)
        text = _runtime_text(tokenizer, references, i)
        rows.append(compare(references, i, stacked, runtime_prompt_match=match, runtime_text=text))
    seconds = time.perf_counter() - start
    progress(f"fidelity scored in {seconds:.1f}s")
    return combine(rows, score_seconds=seconds, references_key=references.key)


def compare(
    references: References,
    i: int,
    logits: NDArray[np.float64],
    *,
    runtime_prompt_match: bool | None = None,
    runtime_text: str | None = None,
) -> PromptFidelity:
    """Prompt ``i``'s figures from the deployed model's logits at each of its answer positions (positions x vocab)."""
    import numpy as np

    span = slice(references.offsets[i], references.offsets[i + 1])
    logq = _log_softmax(np.asarray(logits, dtype=np.float64))
    kld = _kld(references, span, logq)
    tokens = np.array(references.answer_ids[i], dtype=np.int64)
    deployed_top = logq.argmax(axis=1)
    exact = deployed_top == tokens
    agree = exact | _near_tie(references, span, deployed_top)
    disagree = np.flatnonzero(~exact)
    return PromptFidelity(
        index=i,
        prompt=references.prompts[i],
        reference_answer=references.answer_texts[i],
        positions=len(tokens),
        agreed=int(agree.sum()),
        first_divergence=int(disagree[0]) if disagree.size else None,
        mean_kld=float(kld.mean()),
        max_kld=float(kld.max()),
        reference_nll=-float(references.token_logprob[span].astype(np.float64).sum()),
        deployed_nll=-float(logq[np.arange(len(tokens)), tokens].sum()),
        runtime_prompt_match=runtime_prompt_match,
        exact=int(exact.sum()),
        runtime_text=runtime_text,
    )


def combine(rows: Sequence[PromptFidelity], *, score_seconds: float = 0.0, references_key: str = "") -> FidelityResult:
    """All prompts' figures together, each position weighing the same."""
    positions = sum(r.positions for r in rows)
    return FidelityResult(
        prompts=tuple(rows),
        top1_agreement=sum(r.agreed for r in rows) / positions,
        mean_kld=sum(r.mean_kld * r.positions for r in rows) / positions,
        max_kld=max(r.max_kld for r in rows),
        perplexity_ratio=math.exp(sum(r.deployed_nll - r.reference_nll for r in rows) / positions),
        score_seconds=score_seconds,
        references_key=references_key,
        top1_exact=sum(r.exact for r in rows) / positions,
    )


def _near_tie(references: References, span: slice, deployed_top: NDArray[Any]) -> NDArray[np.bool_]:
    """Positions where the deployed top-1 token is one the source itself ranks about as high as its own top-1:
    among the source's stored top-k, within TIE_MARGIN of the top probability. Where the source cannot tell two
    tokens apart, the deployed model picking the other one is not drift. A token outside the stored top-k is
    never forgiven: on a flat source distribution (a large vocabulary, nothing above 2%) any token would be
    within the margin, and a model unrelated to the source would agree everywhere (issue 21, item 4)."""
    import numpy as np

    ids = references.topk_ids[span].astype(np.int64)
    probs = np.exp(references.topk_logprobs[span].astype(np.float64))
    hit = ids == deployed_top[:, None]
    p_deployed = (probs * hit).sum(axis=1)
    near: NDArray[np.bool_] = hit.any(axis=1) & (probs[:, 0] - p_deployed <= TIE_MARGIN)
    return near


def _log_softmax(logits: NDArray[np.float64]) -> NDArray[np.float64]:
    import numpy as np

    top = logits.max(axis=1, keepdims=True)
    out: NDArray[np.float64] = logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))
    return out


def _kld(references: References, span: slice, logq: NDArray[np.float64]) -> NDArray[np.float64]:
    """KL(source || deployed) per position, over the whole vocabulary. ``logq``: the deployed log-probabilities;
    a deployed vocabulary wider than the source's (padding) counts in their normaliser, and its extra tokens,
    which the source never gives mass, add nothing to the sum."""
    import numpy as np

    # The stored float16 log-probabilities, renormalised so that the rounded distribution sums to one.
    logp = _log_softmax(np.asarray(references.logprobs[span], dtype=np.float64))
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):  # p = 0 where logp = -inf: no term
        terms = np.where(p > 0, p * (logp - logq[:, : logp.shape[1]]), 0.0)
    # Rounding leaves tiny negatives where the two agree: clamp them.
    kld: NDArray[np.float64] = np.maximum(terms.sum(axis=1), 0.0)
    return kld


def _runtime_prompt_match(tokenizer: Any, messages: Sequence[Message], prompt_ids: Sequence[int]) -> bool | None:
    """Whether the deployed tokenizer, with the installed chat template, makes the same prompt ids."""
    try:
        text = tokenizer.apply_chat_template(json.dumps(list(messages)), add_generation_prompt=True)
        ids = [int(t) for t in tokenizer.encode(str(text))]
    except Exception:  # a template ORT GenAI cannot render: unknown, not a mismatch
        return None
    return ids == list(prompt_ids)


def _runtime_text(tokenizer: Any, references: References, i: int) -> str | None:
    """The deployed pipeline's text for the source's answer ids (without the end token), decoded as the runtime
    decodes its own answers (``OrtGenaiBackend.decode``, :func:`deployed_answers`)."""
    answer = references.answer_ids[i]
    body = list(answer[:-1] if answer and answer[-1] in references.eos_token_ids else answer)
    try:
        return str(tokenizer.decode(body)) if body else ""
    except Exception:  # the native library raises plain RuntimeError: unknown, not a mismatch
        return None


def deployed_answers(
    model_dir: str | Path,
    references: References,
    indices: Sequence[int] | None = None,
    *,
    max_new_tokens: int | None = None,
    threads: int | None = None,
) -> dict[int, str]:
    """The deployed model's own greedy answers (text) to the reference prompt ids, for a failure message."""
    import onnxruntime_genai as og

    folder = Path(model_dir)
    model = _load_model(folder, threads)
    tokenizer = og.Tokenizer(model)
    config = json.loads((folder / "genai_config.json").read_text())
    eos = config["model"].get("eos_token_id", [])
    eos_ids = {int(t) for t in (eos if isinstance(eos, list) else [eos])} | set(references.eos_token_ids)
    limit = max_new_tokens or references.max_new_tokens
    chosen = range(len(references.prompt_ids)) if indices is None else indices
    answers: dict[int, str] = {}
    for i in chosen:
        prompt_ids = references.prompt_ids[i]
        generator = _generator(og, model, len(prompt_ids) + limit)
        new: list[int] = []
        try:
            generator.append_tokens(list(prompt_ids))
            while not generator.is_done() and len(new) < limit:
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if token in eos_ids:
                    break
                new.append(token)
        except Exception as exc:  # the native library raises plain RuntimeError
            raise FidelityError(f"{folder}: generation failed on {references.prompts[i]!r}: {describe(exc)}") from None
        finally:
            del generator
        answers[i] = str(tokenizer.decode(new)) if new else ""
    return answers
