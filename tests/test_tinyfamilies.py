"""Tiny models of published chat-model families: their templates and tokenizers, and that they deploy.

The fast tests need no trained model (a tokenizer trains in a fraction of a
second); one slow test per family trains the model, builds it at INT4 with
Olive and checks every answer through ONNX Runtime GenAI.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pytest_slmdeploy.template import CHATML_TEMPLATE, TemplateError, render_chat
from pytest_slmdeploy.testing.tinyfamilies import FAMILIES, LLAMA3_DATES, family, filler_pairs, generic_pairs
from pytest_slmdeploy.testing.tinymodel import FAQ, TinyModelSpec, family_spec, make_family_tokenizer, render_prompt

KEYS = [key for key in FAMILIES if key != "chatml"]

# sha256 of each chat template, as published (tokenizer_config.json of the model named in ``source``).
TEMPLATE_DIGESTS = {
    "chatml": "f91864928fccff92",
    "qwen2.5": "cd8e9439f0570856",
    "llama3": "5816fce10444e03c",
    "phi3": "78d976a442bcde2f",
    "gemma2": "ecd6ae513fe103f0",
    "gemma3": "d2f96210400e3814",
    "mistral": "e16746b40344d6c5",
    "smollm2": "872be49dbb638044",
}

# What each template makes of a user-only request: Foundry Local's "prompt" for the family.
PROMPTS = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "phi3": "<|user|>\nHi<|end|>\n<|assistant|>\n",
    "gemma2": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "gemma3": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "mistral": "<s>[INST] Hi[/INST]",
    "smollm2": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
}

# Where each published tokenizer.json puts the special tokens: ids inside the BPE vocabulary, and offsets from
# its size of those added after it (Llama 3.2: 128,000 BPE tokens, so <|eot_id|> is 128009; Qwen2.5: 151,643,
# <|im_end|> is 151645; Phi-3.5: 32,000 SentencePiece tokens, <|end|> is 32007). Gemma 2 and 3, Mistral v0.3 and
# SmolLM2 keep theirs inside the vocabulary.
INSIDE_AND_ADDED: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "chatml": ({"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}, {}),
    "qwen2.5": ({}, {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}),
    "llama3": (
        {},
        {
            "<|begin_of_text|>": 0,
            "<|end_of_text|>": 1,
            "<|finetune_right_pad_id|>": 4,
            "<|start_header_id|>": 6,
            "<|end_header_id|>": 7,
            "<|eom_id|>": 8,
            "<|eot_id|>": 9,
            "<|python_tag|>": 10,
            "<|reserved_special_token_247|>": 255,
        },
    ),
    "phi3": (
        {"<unk>": 0, "<s>": 1, "</s>": 2},
        {"<|endoftext|>": 0, "<|assistant|>": 1, "<|system|>": 6, "<|end|>": 7, "<|user|>": 10},
    ),
    "gemma2": ({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}, {}),
    "gemma3": ({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}, {}),
    "mistral": ({"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4}, {}),
    "smollm2": ({"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}, {}),
}

CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "user": [{"role": "user", "content": "Where is the office?"}],
    "system-user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the office?"}],
    "user-assistant-user": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "  Where is the office?  "},
    ],
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's tokenizer folder (no model): tokenizer.json and tokenizer_config.json."""
    root = tmp_path_factory.mktemp("family-tokenizers")
    return {key: make_family_tokenizer(root / key, TinyModelSpec(family=key)) for key in FAMILIES}


def hf_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def input_ids(encoded: Any) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list or (transformers 5) a BatchEncoding."""
    return [int(i) for i in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)]


@pytest.mark.parametrize("key", list(FAMILIES))
def test_templates_are_the_published_ones(key: str) -> None:
    assert hashlib.sha256(family(key).chat_template.encode()).hexdigest()[:16] == TEMPLATE_DIGESTS[key]


def test_the_default_spec_is_the_chatml_model() -> None:
    assert TinyModelSpec().family == "chatml"
    assert TinyModelSpec().chat_template == CHATML_TEMPLATE
    assert TinyModelSpec(family="gemma2").chat_template == family("gemma2").chat_template
    assert TinyModelSpec(family="gemma2", chat_template=None).chat_template is None
    assert family_spec("phi3").extra_pairs == (*generic_pairs(), *filler_pairs())
    with pytest.raises(ValueError, match=r"unknown model family 'llama2'.*llama3"):
        TinyModelSpec(family="llama2")


def test_generic_prompts_get_clean_answers() -> None:
    from pytest_slmdeploy.checklist.format import GENERIC_PROMPTS, STOP_PROMPTS

    assert [prompt for prompt, _ in generic_pairs()] == [*GENERIC_PROMPTS, *STOP_PROMPTS]
    assert all(answer.strip() for _, answer in generic_pairs())


@pytest.mark.parametrize("key", list(FAMILIES))
def test_user_only_prompt(tokenizers: dict[str, Path], key: str) -> None:
    tokenizer = hf_tokenizer(tokenizers[key])
    assert render_prompt(tokenizer, "Hi", "26 Jul 2024" if family(key).dated else None) == PROMPTS[key]


@pytest.mark.parametrize("key", list(FAMILIES))
def test_special_tokens_sit_where_the_published_ones_do(tokenizers: dict[str, Path], key: str) -> None:
    """Inside the BPE vocabulary, or added after it in the published order; config.json's ids follow."""
    inside, added = INSIDE_AND_ADDED[key]
    fam = family(key)
    saved = json.loads((tokenizers[key] / "tokenizer.json").read_text())
    vocab = saved["model"]["vocab"]
    ids = {token["content"]: token["id"] for token in saved["added_tokens"]}
    assert list(ids) == list(fam.special_tokens)
    assert {token: vocab.get(token) for token in inside} == inside
    assert {token: ids[token] - len(vocab) for token in added} == added
    outside = [token for token in fam.special_tokens if token not in vocab]
    assert [ids[token] for token in outside] == list(range(len(vocab), len(vocab) + len(outside)))
    decoder = json.loads((tokenizers[key] / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {entry["content"]: int(i) for i, entry in decoder.items()} == ids
    config = json.loads((tokenizers[key] / "config.json").read_text())
    assert config["vocab_size"] == len(vocab) + len(outside)
    ends = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    assert ends == [ids[token] for token in fam.config_eos]
    assert config["bos_token_id"] == (ids[fam.config_bos] if fam.config_bos else None)
    if key == "llama3":  # as published: 128,000 + 256 tokens, bos 128000, eos [128001, 128008, 128009]
        assert len(outside) == 256
        assert not inside
        assert (config["bos_token_id"], ends) == (len(vocab), [len(vocab) + 1, len(vocab) + 8, len(vocab) + 9])


def test_llama3_end_tokens_take_the_streaming_decoders_space_path(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    """Llama 3's end tokens are outside the BPE vocabulary and clean_up_tokenization_spaces is true, so ONNX
    Runtime GenAI's streaming decoder (and so Foundry Local's text) writes each as " ": the Foundry backend
    drops that piece. With the specials inside the vocabulary the tokenizer_config eos_token would write none."""
    import shutil

    from pytest_slmdeploy.runtime.foundrylocal import EntryText

    entry = Path(shutil.copytree(tokenizers["llama3"], tmp_path / "entry"))
    config = json.loads((entry / "config.json").read_text())
    genai = {"context_length": 512, "eos_token_id": config["eos_token_id"], "vocab_size": config["vocab_size"]}
    (entry / "genai_config.json").write_text(json.dumps({"model": genai}))
    text = EntryText(entry)
    assert text.tokenizer_config["clean_up_tokenization_spaces"] is True
    assert text.specials_write_space
    assert text.end_piece == ("  ", " ")


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("key", list(FAMILIES))
def test_renders_like_transformers(tokenizers: dict[str, Path], key: str, conversation: str) -> None:
    """The plugin's renderer, given the saved tokenizer_config.json, renders as transformers does."""
    tokenizer = hf_tokenizer(tokenizers[key])
    config = json.loads((tokenizers[key] / "tokenizer_config.json").read_text())
    messages = CONVERSATIONS[conversation]
    for generate in (True, False):
        try:
            expected: str | None = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generate
            )
        except Exception:  # the template's own raise_exception (Gemma: no system role)
            expected = None
        if expected is None:
            with pytest.raises(TemplateError):
                render_chat(config["chat_template"], messages, add_generation_prompt=generate, tokenizer_config=config)
        else:
            rendered = render_chat(
                config["chat_template"], messages, add_generation_prompt=generate, tokenizer_config=config
            )
            assert rendered == expected


def test_family_specific_renderings(tokenizers: dict[str, Path]) -> None:
    def render(key: str, conversation: str, generate: bool = True) -> str:
        messages = CONVERSATIONS[conversation]
        return str(
            hf_tokenizer(tokenizers[key]).apply_chat_template(messages, tokenize=False, add_generation_prompt=generate)
        )

    assert render("phi3", "user", generate=False) == "<|user|>\nWhere is the office?<|end|>\n<|endoftext|>"
    assert render("mistral", "system-user") == "<s>[INST] Be brief.\n\nWhere is the office?[/INST]"
    assert render("mistral", "user-assistant-user") == (
        "<s>[INST] Hello[/INST] Hello! How can I help you today?</s>[INST]   Where is the office?  [/INST]"
    )
    assert render("gemma2", "user-assistant-user").endswith(
        "<start_of_turn>model\nHello! How can I help you today?<end_of_turn>\n"
        "<start_of_turn>user\nWhere is the office?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert render("qwen2.5", "system-user").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "named SmolLM" not in render("smollm2", "system-user")
    with pytest.raises(Exception, match="System role not supported"):
        render("gemma2", "system-user")


@pytest.mark.parametrize("key", list(FAMILIES))
def test_tokenizer(tokenizers: dict[str, Path], key: str) -> None:
    """Each special token is one id; the template's own BOS is the only one; unseen text round-trips."""
    fam = family(key)
    tokenizer = hf_tokenizer(tokenizers[key])
    for token in fam.special_tokens:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    ids = input_ids(tokenizer.apply_chat_template(CONVERSATIONS["user"], tokenize=True, add_generation_prompt=True))
    if fam.bos_token is not None and PROMPTS[key].startswith(fam.bos_token):
        bos = tokenizer.convert_tokens_to_ids(fam.bos_token)
        assert ids[0] == bos
        assert ids[1] != bos
    text = "Ünïcödé, 3.14 ☕ tabs\tand  spaces"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    if fam.tokenizer == "sentencepiece":
        assert tokenizer.convert_tokens_to_ids("<0xE2>") is not None
        assert "<0xE2>" in tokenizer.convert_ids_to_tokens(tokenizer("☕", add_special_tokens=False)["input_ids"])


def test_llama3_is_trained_under_many_dates() -> None:
    from pytest_slmdeploy.testing.tinymodel import template_dates

    dates = template_dates(family("llama3"))
    assert dates[0] == "26 Jul 2024"
    assert len(set(LLAMA3_DATES)) == len(LLAMA3_DATES) >= 30
    assert len({date.split()[1] for date in dates}) == 12  # every month
    assert template_dates(family("phi3")) == (None,)


def answers_to_rendered_prompts(
    model_dir: Path, prompts: list[str], max_new_tokens: int = 48
) -> list[tuple[str, bool]]:
    """ONNX Runtime GenAI, greedy, on already rendered prompts: (answer, stopped by an end token) each."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    ends = json.loads((model_dir / "genai_config.json").read_text())["model"]["eos_token_id"]
    ends = ends if isinstance(ends, list) else [ends]
    answers = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        stopped = bool(new) and new[-1] in ends
        answers.append((str(tokenizer.decode(new[:-1] if stopped else new)), stopped))
    return answers


def ort_template_differences(model_dir: Path, tokenizer: Any, bos: str | None) -> list[str]:
    """Where ONNX Runtime GenAI renders a conversation otherwise than transformers, or adds a BOS of its own."""
    import onnxruntime_genai as og

    ort = og.Tokenizer(og.Model(str(model_dir)))
    found = []
    for name, messages in CONVERSATIONS.items():
        try:
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # the template's own refusal (Gemma: no system role): ONNX Runtime GenAI must refuse too
            expected = None
        try:
            got = ort.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except RuntimeError:
            got = None
        if got != expected:
            found.append(f"ort-genai renders {name} as {got!r}, transformers as {expected!r}")
    text = tokenizer.apply_chat_template(CONVERSATIONS["user"], tokenize=False, add_generation_prompt=True)
    ids = [int(i) for i in ort.encode(text)]
    if bos is not None and ids[:2] == [tokenizer.convert_tokens_to_ids(bos)] * 2:
        found.append(f"ort-genai encodes {text!r} with a second {bos}")
    return found


@pytest.mark.parametrize("key", KEYS)
def test_family_model_answers_through_ort_genai_int4(family_models: Any, key: str, tmp_path: Path) -> None:
    """Trained (transformers greedy exact), built at INT4 with Olive, exact through ONNX Runtime GenAI,
    which renders the chat template as transformers does."""
    from transformers import AutoModelForCausalLM

    from pytest_slmdeploy import build
    from pytest_slmdeploy.runtime.ortgenai import OrtGenaiBackend
    from pytest_slmdeploy.runtime.protocol import GenerationOptions
    from pytest_slmdeploy.source import inspect_source

    fam = family(key)
    model_dir = family_models(key)
    pairs = [*FAQ, *generic_pairs()]
    tokenizer = hf_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    wrong = []
    for question, answer in pairs:
        ids = tokenizer(render_prompt(tokenizer, question), add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1] :].tolist()
        if tokenizer.decode(out, skip_special_tokens=True) != answer:
            wrong.append(f"transformers: {question!r} -> {tokenizer.decode(out)!r}")
    assert not wrong, "\n".join(wrong)

    built = tmp_path / "int4"
    build.run_olive(build.olive_config(inspect_source(model_dir), "int4"), built, tmp_path / "work")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (built / name).is_file(), f"the model builder wrote no {name}"
    backend = OrtGenaiBackend(built)
    try:
        for question, answer in pairs:
            got = backend.generate(question, GenerationOptions(max_new_tokens=48))
            if (got.text, got.finish_reason) != (answer, "stop"):
                wrong.append(f"ort-genai: {question!r} -> {got.text!r} ({got.finish_reason})")
    finally:
        backend.close()
    wrong += ort_template_differences(built, tokenizer, fam.bos_token)
    if fam.dated:  # a PromptTemplate renders the fixed date, ONNX Runtime GenAI today's: both must work
        prompts = [render_prompt(tokenizer, question, "26 Jul 2024") for question, _ in pairs]
        for (question, answer), (text, stopped) in zip(pairs, answers_to_rendered_prompts(built, prompts), strict=True):
            if (text, stopped) != (answer, True):
                wrong.append(f"ort-genai, 26 Jul 2024: {question!r} -> {text!r}")
    assert not wrong, "\n".join(wrong)
