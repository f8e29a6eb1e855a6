"""Make tiny, really trained chat models on the fly (tests and the example project).

No generative model ships in a PyPI package and nothing may be downloaded, so
tests train their own: a byte-level BPE tokenizer with ChatML specials, a
two-layer Qwen2 model, and a few hundred AdamW steps on question/answer pairs
until greedy decoding reproduces every answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pytest_slmdeploy.template import CHATML_TEMPLATE

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
    """What to make: the Q/A pairs, the shape, and the training budget."""

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
    chat_template: str | None = CHATML_TEMPLATE
    extra_config: dict[str, object] = field(default_factory=dict)


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
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    batches = []
    for rows in _length_buckets([len(ids) for ids in encoded]):  # long prompts do not pad the short ones
        width = max(len(encoded[row]) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids, plen = encoded[row], prompt_lens[row]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, plen : len(ids)] = torch.tensor(ids[plen:])
        batches.append((input_ids, attention, labels, int((labels != -100).sum())))
    total_targets = sum(batch[3] for batch in batches)

    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate)
    model.train()
    for _ in range(spec.steps):
        optimizer.zero_grad()
        for input_ids, attention, labels, targets in batches:  # one step over all pairs, as one batch would be
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            (loss * (targets / total_targets)).backward()
        optimizer.step()
    model.eval()

    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_cases(out / "slm_cases.yaml", spec.pairs)
    return out


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
