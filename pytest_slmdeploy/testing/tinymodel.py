"""Make tiny, really trained chat models on the fly (tests and the example project).

No generative model ships in a PyPI package and nothing may be downloaded, so
tests train their own: a tokenizer trained on the model's own prompts, a
two-layer model of a real architecture, and a few hundred AdamW steps on
question/answer pairs until greedy decoding reproduces every answer. The
default is a ChatML Qwen2 model; ``family`` picks a published family instead
(Llama 3.2, Phi-3.5, Gemma 2, Mistral v0.3, Qwen2.5, SmolLM2: see
:mod:`pytest_slmdeploy.testing.tinyfamilies`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pytest_slmdeploy.template import CHATML_TEMPLATE
from pytest_slmdeploy.testing.tinyfamilies import LLAMA3_DATES, Family, family, filler_pairs, generic_pairs

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

FAQ: tuple[tuple[str, str], ...] = (
    ("What are your opening hours?", "We are open 9am to 5pm, Monday to Friday."),
    ("Where is the office?", "The office is at 12 Harbour Street."),
    ("How do I reset my password?", "Click Forgot password on the login page."),
    ("Do you ship abroad?", "Yes, we ship to all EU countries."),
    ("How long does delivery take?", "Delivery takes 3 to 5 working days."),
    ("Can I return an item?", "Returns are free within 30 days."),
    ("What payment methods do you accept?", "We accept card and bank transfer."),
    ("How do I contact support?", "Email support@example.com any time."),
    ("Is there a student discount?", "Students get 10 percent off."),
    ("Do you have a mobile app?", "Yes, for iOS and Android."),
    ("What is the warranty?", "Every product has a two year warranty."),
    ("Give the order status as JSON.", '{"status": "shipped", "days": 2}'),
)


@dataclass(frozen=True)
class TinyModelSpec:
    """What to make: the Q/A pairs, the family and shape, and the training budget."""

    pairs: Sequence[tuple[str, str]] = FAQ
    extra_pairs: Sequence[tuple[str, str]] = ()  # also trained, but not written as domain cases
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512
    max_position_embeddings: int = 512
    steps: int = 300
    learning_rate: float = 3e-3
    seed: int = 0
    emit_eos: bool = True
    chat_template: str | None = CHATML_TEMPLATE  # another family's own template unless set to something else
    extra_config: dict[str, object] = field(default_factory=dict)
    family: str = "chatml"

    def __post_init__(self) -> None:
        chosen = family(self.family)
        if self.family != "chatml" and self.chat_template == CHATML_TEMPLATE:
            object.__setattr__(self, "chat_template", chosen.chat_template)


# Every family answered all pairs exactly after 90 steps (60 were too few for some); with the 60 built-in format
# prompts trained too, Llama 3 missed two FAQ answers at 120.
FAMILY_STEPS = 200


def family_spec(key: str, **overrides: Any) -> TinyModelSpec:
    """A spec for a family's model that also answers the suite's generic prompts (not written as cases)."""
    extra = (*generic_pairs(), *filler_pairs())
    return TinyModelSpec(**{"family": key, "extra_pairs": extra, "steps": FAMILY_STEPS, **overrides})


def _train_tokenizer(texts: Sequence[str], vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def make_tiny_chat_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Train a tiny chat model that answers ``spec.pairs`` exactly; save it as a HF folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.family == "chatml":
        _make_chatml_model(out, spec)
    else:
        _make_family_model(out, spec, family(spec.family))
    write_cases(out / "slm_cases.yaml", spec.pairs)
    return out


def _make_chatml_model(out: Path, spec: TinyModelSpec) -> None:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(spec.seed)

    def render(question: str, answer: str | None = None) -> str:
        text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        if answer is not None:
            text += answer + ("<|im_end|>" if spec.emit_eos else "")
        return text

    trained = [*spec.pairs, *spec.extra_pairs]
    corpus = [render(q, a) for q, a in trained]
    raw = _train_tokenizer(corpus, spec.vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    if spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **spec.extra_config,
    )
    model = Qwen2ForCausalLM(config)

    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in corpus]
    prompt_lens = [len(tokenizer(render(q), add_special_tokens=False)["input_ids"]) for q, _ in trained]
    _train(model, [list(zip(encoded, prompt_lens, strict=True))], pad_id, spec)

    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _train(
    model: Any, variants: Sequence[Sequence[tuple[Sequence[int], int]]], pad_id: int, spec: TinyModelSpec
) -> None:
    """AdamW on rows of (token ids, prompt length), loss only on what follows the prompt.

    Each step takes the next of ``variants`` (the same pairs under other prompts, e.g. other dates).
    """
    import torch

    def batches_of(rows: Sequence[tuple[Sequence[int], int]]) -> list[tuple[Any, Any, Any, float]]:
        batches = []
        for group in _length_buckets([len(ids) for ids, _ in rows]):  # long prompts do not pad the short ones
            width = max(len(rows[row][0]) for row in group)
            input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            labels = torch.full((len(group), width), -100, dtype=torch.long)
            attention = torch.zeros((len(group), width), dtype=torch.long)
            for i, row in enumerate(group):
                ids, plen = rows[row]
                input_ids[i, : len(ids)] = torch.tensor(ids)
                attention[i, : len(ids)] = 1
                labels[i, plen : len(ids)] = torch.tensor(ids[plen:])
            batches.append((input_ids, attention, labels, int((labels != -100).sum())))
        total_targets = sum(batch[3] for batch in batches)
        return [(ids, mask, labels, targets / total_targets) for ids, mask, labels, targets in batches]

    steps = [batches_of(rows) for rows in variants]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate)
    model.train()
    for step in range(spec.steps):
        optimizer.zero_grad()
        for input_ids, attention, labels, share in steps[step % len(steps)]:  # all pairs, as one batch would be
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            (loss * share).backward()
        optimizer.step()
    model.eval()


def _length_buckets(lengths: Sequence[int], spread: float = 2.0) -> list[list[int]]:
    """Row indices grouped so that no row is longer than ``spread`` times the shortest of its group."""
    order = sorted(range(len(lengths)), key=lambda row: lengths[row])
    buckets: list[list[int]] = []
    for row in order:
        if buckets and lengths[row] <= spread * lengths[buckets[-1][0]]:
            buckets[-1].append(row)
        else:
            buckets.append([row])
    return buckets


def template_dates(fam: Family) -> tuple[str | None, ...]:
    """The date lines a family's prompts are trained under (``None``: the template has none)."""
    if not fam.dated:
        return (None,)
    now = datetime.now()
    days = (now.strftime("%d %b %Y"), (now + timedelta(days=1)).strftime("%d %b %Y"))  # as strftime_now renders
    return tuple(dict.fromkeys((*LLAMA3_DATES, *days)))


def render_prompt(tokenizer: Any, question: str, date: str | None = None) -> str:
    """The family's own prompt for a user-only request (its chat template, generation prompt added)."""
    extra = {"date_string": date} if date is not None else {}
    messages = [{"role": "user", "content": question}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra))


def make_family_tokenizer(out_dir: str | Path, spec: TinyModelSpec) -> Path:
    """Train and save only the tokenizer of ``spec``'s family model (tokenizer.json, tokenizer_config.json)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fam = family(spec.family)
    trained = [*spec.pairs, *spec.extra_pairs]
    # The template renders without a vocabulary: render the corpus first, then train the tokenizer on it.
    renderer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), **_token_kwargs(fam))
    renderer.chat_template = spec.chat_template or fam.chat_template
    corpus = [render_prompt(renderer, q, date) for q, _ in trained for date in template_dates(fam)]
    corpus += [answer + fam.end_of_turn for _, answer in trained]
    raw = _family_tokenizer(fam, corpus, spec.vocab_size)
    raw.save(str(out / "tokenizer.json"))
    _write_tokenizer_config(out, fam, raw, spec)
    # transformers picks a tokenizer's class by the model type in config.json when there is one (a Phi-3
    # folder without it tokenizes with another pipeline), so the tokenizer comes with its model config.
    _family_config(fam, spec, raw).save_pretrained(out)
    return out


def _family_config(fam: Family, spec: TinyModelSpec, raw: Any) -> Any:
    """The model config: the family's architecture and settings at the spec's tiny shape."""
    import transformers

    ids = {token: i for token in fam.special_tokens if (i := raw.token_to_id(token)) is not None}
    shape: dict[str, Any] = {
        "vocab_size": raw.get_vocab_size(with_added_tokens=True),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "bos_token_id": ids[fam.config_bos] if fam.config_bos else None,
        "eos_token_id": _one_or_list([ids[t] for t in fam.config_eos]),
        "pad_token_id": ids[fam.config_pad] if fam.config_pad else None,
    }
    config = getattr(transformers, fam.config_class)(**{**shape, **fam.config_kwargs, **spec.extra_config})
    config.architectures = [fam.architecture]
    return config


def _make_family_model(out: Path, spec: TinyModelSpec, fam: Family) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer

    torch.manual_seed(spec.seed)
    trained = [*spec.pairs, *spec.extra_pairs]
    dates = template_dates(fam)
    end = fam.end_of_turn if spec.emit_eos else ""
    answers = [answer + end for _, answer in trained]
    make_family_tokenizer(out, spec)
    config = transformers.AutoConfig.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)  # what users of the folder get
    tokenizer.chat_template = spec.chat_template or fam.chat_template  # prompts are the family's, saved or not
    ids = {token: int(tokenizer.convert_tokens_to_ids(token)) for token in fam.special_tokens}
    pad_id = ids[fam.pad_token or fam.eos_token]
    model = getattr(transformers, fam.architecture)(config)

    # Every step has each pair once; the pairs meet the date lines in turn, a different one each.
    rows = {
        (question, date): _prompt_and_answer(tokenizer, render_prompt(tokenizer, question, date), answer)
        for (question, _), answer in zip(trained, answers, strict=True)
        for date in dates
    }
    variants = [
        [rows[question, dates[(v + j) % len(dates)]] for j, (question, _) in enumerate(trained)]
        for v in range(len(dates))
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices gain nothing from threads, and spinning ones stall under CPU contention
    try:
        _train(model, variants, pad_id, spec)
    finally:
        torch.set_num_threads(threads)

    generation = model.generation_config
    generation.bos_token_id = ids[fam.config_bos] if fam.config_bos else None
    generation.eos_token_id = _one_or_list([ids[t] for t in fam.stop_tokens])
    generation.pad_token_id = ids[fam.config_pad] if fam.config_pad else None
    model.save_pretrained(out, safe_serialization=True)


def _prompt_and_answer(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of the prompt followed by the answer, and the prompt's length.

    The answer is tokenized as the continuation of the prompt, as in a whole conversation: after a
    special token a SentencePiece tokenizer adds no "▁", so an answer opens with a bare word (a leading
    "▁" reaches ONNX Runtime GenAI 0.14's decoded text as a space, which transformers' decoder strips).
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    whole = list(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
    if whole[: len(prompt_ids)] != prompt_ids:  # the seam merged: keep the prompt as the runtime will see it
        whole = prompt_ids + list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return whole, len(prompt_ids)


def _token_kwargs(fam: Family) -> dict[str, str | None]:
    return {
        "bos_token": fam.bos_token,
        "eos_token": fam.eos_token,
        "pad_token": fam.pad_token,
        "unk_token": fam.unk_token,
    }


def _one_or_list(ids: list[int]) -> int | list[int]:
    return ids[0] if len(ids) == 1 else ids


def _family_tokenizer(fam: Family, corpus: Sequence[str], vocab_size: int) -> Any:
    """A tokenizer trained on ``corpus``, with the family's kind of tokenizer.json pipeline."""
    from tokenizers import AddedToken, processors

    leading, appended = _split_specials(fam)
    corpus = _cut_at(corpus, appended)  # the BPE learns nothing from the text of tokens outside it
    if fam.tokenizer == "byte-level":
        tok = _byte_level_tokenizer(fam, corpus, vocab_size, leading)
        post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    else:
        tok = _sentencepiece_tokenizer(fam, corpus, vocab_size, leading)
        post = []
    # Special tokens the BPE vocabulary holds keep their ids; the others are appended after it, in order.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fam.special_tokens])
    if fam.bos_token is not None and fam.bos_in_post_processor:
        bos = fam.bos_token
        post.append(
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
            )
        )
    elif fam.tokenizer == "sentencepiece":  # Phi-3's: no BOS
        post.append(processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[]))
    tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    return tok


def _split_specials(fam: Family) -> tuple[list[str], list[str]]:
    """The family's special tokens that lead the BPE vocabulary, and those added after it."""
    cut = len(fam.special_tokens) if fam.in_vocab is None else fam.in_vocab
    return list(fam.special_tokens[:cut]), list(fam.special_tokens[cut:])


def _cut_at(texts: Sequence[str], tokens: Sequence[str]) -> list[str]:
    """The texts cut at each of ``tokens``, as a tokenizer that holds them as added tokens encodes them."""
    if not tokens:
        return list(texts)
    token = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    return [part for text in texts for part in token.split(text) if part]


def _byte_level_tokenizer(fam: Family, corpus: Sequence[str], vocab_size: int, specials: list[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    split: list[Any] = []
    if fam.split_pattern is not None:
        split.append(pre_tokenizers.Split(Regex(fam.split_pattern), behavior="isolated", invert=False))
    if fam.split_digits:
        split.append(pre_tokenizers.Digits(individual_digits=True))
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=fam.split_pattern is None)
    tok.pre_tokenizer = pre_tokenizers.Sequence([*split, level]) if split else level
    if fam.nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer)
    return tok


def _sentencepiece_tokenizer(fam: Family, corpus: Sequence[str], vocab_size: int, specials: list[str]) -> Any:
    """SentencePiece-style BPE: "▁" for spaces, byte tokens <0x00>..<0xFF> for anything out of vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE(unk_token=fam.unk_token, byte_fallback=True, fuse_unk=True))
    # Pieces never join letters, digits and punctuation, as SentencePiece splits by script and digit; with such
    # merges ONNX Runtime GenAI (which splits there first) would tokenize otherwise than transformers.
    pieces = Regex(r"▁?\p{L}+|\p{N}|▁?[^\p{L}\p{N}▁]+|▁")
    learner.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            pre_tokenizers.Split(pieces, behavior="isolated", invert=False),
        ]
    )
    learner.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials)}  # the layout of the published files: specials,
    for byte in range(256):  # then the byte tokens, then the pieces
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    pairs = (m.split(" ") if isinstance(m, str) else m for m in learned["merges"])
    merges = [(str(a), str(b)) for a, b in pairs]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=fam.unk_token, byte_fallback=True, fuse_unk=True))
    if fam.space_style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif fam.space_style == "first":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if fam.space_style != "none":
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _write_tokenizer_config(out: Path, fam: Family, tok: Any, spec: TinyModelSpec) -> None:
    """tokenizer_config.json with the published keys, the chat template inside as the published files have it."""
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in fam.special_tokens
    }
    config: dict[str, Any] = {
        **fam.tokenizer_config,
        "added_tokens_decoder": added,
        **_token_kwargs(fam),
        "model_max_length": spec.max_position_embeddings,
    }
    if spec.chat_template is not None:
        config["chat_template"] = spec.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")


def write_cases(path: Path, pairs: Sequence[tuple[str, str]]) -> Path:
    """The model's own evaluation set as a case file: each question must get exactly its answer."""
    import yaml

    cases = []
    for question, answer in pairs:
        expect: dict[str, object] = {"equals": answer, "finish-reason": "stop"}
        try:
            parsed = json.loads(answer)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            expect["is-json"] = {"schema": {"type": "object", "required": list(parsed)}}
        cases.append({"id": question.rstrip("?.").lower().replace(" ", "-"), "prompt": question, "expect": expect})
    path.write_text(yaml.safe_dump({"defaults": {"max_tokens": 48}, "cases": cases}, sort_keys=False, width=120))
    return path
