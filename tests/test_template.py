from __future__ import annotations

from pathlib import Path

import pytest

from pytest_slmdeploy.template import (
    CHATML_TEMPLATE,
    FIXED_DATE,
    PromptTemplate,
    TemplateError,
    derive_prompt_template,
    fill_prompt_template,
    render_chat,
)

QWEN25_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ m['content'] }}{% endfor %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ],
]
CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, QWEN25_LIKE, LLAMA3_LIKE], ids=["chatml", "qwen25", "llama3"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system-user", "multi-turn", "system-multi-turn"])
def test_parts_reproduce_the_template(template: str, messages: list[dict[str, str]]) -> None:
    derived = derive_prompt_template(template, CONFIG)
    expected = render_chat(template, messages, add_generation_prompt=True, tokenizer_config=CONFIG, today=FIXED_DATE)
    assert fill_prompt_template(derived.parts, messages) == expected
    assert derived.supports_system
    assert derived.supports_multi_turn


def test_chatml_parts() -> None:
    assert derive_prompt_template(CHATML_TEMPLATE) == PromptTemplate(
        {
            "prompt": "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n",
            "user": "<|im_start|>user\n{Content}<|im_end|>\n",
            "assistant": "<|im_start|>assistant\n{Content}<|im_end|>\n",
            "system": "<|im_start|>system\n{Content}<|im_end|>\n",
        }
    )


def test_prompt_is_the_whole_single_turn_rendering_with_the_default_system_prompt() -> None:
    parts = derive_prompt_template(QWEN25_LIKE).parts
    assert parts["prompt"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "You are a helpful assistant." not in parts["system"] + parts["user"] + parts["assistant"]


def test_prompt_keeps_the_bos_text() -> None:
    parts = derive_prompt_template(LLAMA3_LIKE, CONFIG).parts
    assert parts["prompt"].startswith("<|begin_of_text|><|start_header_id|>user")
    assert parts["system"].startswith("<|begin_of_text|>")
    assert not parts["user"].startswith("<|begin_of_text|>")


def test_a_template_without_a_system_role_has_no_system_part_and_says_so() -> None:
    derived = derive_prompt_template(NO_SYSTEM)
    assert "system" not in derived.parts
    assert any("refuses them (System role not supported)" in note for note in derived.notes)
    with pytest.raises(TemplateError, match="no system part"):
        fill_prompt_template(derived.parts, CONVERSATIONS[1])


DATED = (
    "{{ bos_token }}{% set date_string = strftime_now('%d %b %Y') %}Today Date: {{ date_string }}\n"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_a_dated_header_is_rendered_with_the_fixed_date_and_noted() -> None:
    derived = derive_prompt_template(DATED, CONFIG)
    assert "Today Date: 26 Jul 2024" in derived.parts["prompt"]
    assert any(note.startswith("dated header") for note in derived.notes)
    assert derive_prompt_template(DATED, CONFIG) == derived, "the same template must give the same entry any day"


def test_template_that_drops_content_is_a_clear_error() -> None:
    with pytest.raises(TemplateError, match="exactly once"):
        derive_prompt_template("{% for m in messages %}{{ m['role'] }}{% endfor %}")


def test_template_that_cannot_render_a_user_message_names_the_reason() -> None:
    with pytest.raises(TemplateError, match=r"cannot render a single user message .*no users here"):
        derive_prompt_template("{{ raise_exception('no users here') }}")


def test_same_rendering_as_transformers(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for messages in CONVERSATIONS:
        ours = render_chat(tokenizer.chat_template, messages, add_generation_prompt=True)
        assert ours == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
