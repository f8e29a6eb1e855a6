from __future__ import annotations

from pathlib import Path

import pytest

from pytest_slmdeploy.template import (
    CHATML_TEMPLATE,
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
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ],
]


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, QWEN25_LIKE, LLAMA3_LIKE], ids=["chatml", "qwen25", "llama3"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["system-user", "multi-turn"])
def test_parts_reproduce_the_template(template: str, messages: list[dict[str, str]]) -> None:
    config = {"bos_token": "<|begin_of_text|>"}
    parts = derive_prompt_template(template, config)
    expected = render_chat(template, messages, add_generation_prompt=True, tokenizer_config=config)
    assert fill_prompt_template(parts, messages) == expected


def test_chatml_single_turn_is_the_prompt_part() -> None:
    user_only = [{"role": "user", "content": "Hi"}]
    expected = render_chat(CHATML_TEMPLATE, user_only, add_generation_prompt=True)
    assert fill_prompt_template(derive_prompt_template(CHATML_TEMPLATE), user_only) == expected


def test_chatml_parts() -> None:
    assert derive_prompt_template(CHATML_TEMPLATE) == {
        "system": "<|im_start|>system\n{Content}<|im_end|>\n",
        "user": "<|im_start|>user\n{Content}<|im_end|>\n",
        "assistant": "<|im_start|>assistant\n{Content}<|im_end|>\n",
        "prompt": "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n",
    }


def test_a_default_system_prompt_has_no_slot() -> None:
    parts = derive_prompt_template(QWEN25_LIKE)
    assert "You are a helpful assistant." not in "".join(parts.values())
    assert parts["prompt"] == "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n"


def test_template_without_a_system_role_opens_with_a_user_turn() -> None:
    parts = derive_prompt_template(NO_SYSTEM)
    assert parts["system"] == parts["user"] == "{Content}"


def test_template_that_drops_content_is_a_clear_error() -> None:
    with pytest.raises(TemplateError, match="does not contain the message exactly once"):
        derive_prompt_template("{% for m in messages %}{{ m['role'] }}{% endfor %}")


def test_same_rendering_as_transformers(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for messages in CONVERSATIONS:
        ours = render_chat(tokenizer.chat_template, messages, add_generation_prompt=True)
        assert ours == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
