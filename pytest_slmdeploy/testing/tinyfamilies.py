"""The chat-model families the tiny test models come in: published chat templates, special tokens and shapes.

Each family copies, verbatim, what the published instruct model ships (its
``tokenizer_config.json`` chat template, special tokens, BOS/EOS settings and
``generation_config.json`` stop tokens) on the real transformers architecture,
with the special tokens where its ``tokenizer.json`` has them: the first ids of
the BPE vocabulary, or added tokens after it (Llama 3, Qwen2.5, Phi-3's chat
tokens; with Llama 3's ``clean_up_tokenization_spaces`` that placement decides
what ONNX Runtime GenAI's streaming decoder writes for them),
so a tiny model trained in seconds meets the same template and tokenizer code
paths as the real one. :func:`pytest_slmdeploy.testing.tinymodel.make_tiny_chat_model`
builds them; ``chatml`` is the plain ChatML Qwen2 model tests always used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Literal

from pytest_slmdeploy.template import CHATML_TEMPLATE

TokenizerKind = Literal["byte-level", "sentencepiece"]
# How a SentencePiece-style tokenizer.json marks spaces, as each published file does:
# "legacy" prepends "▁" to every text segment (Phi-3 normalizer), "first" only to the
# start of the text (Metaspace pre-tokenizer, Mistral v0.3), "none" never (Gemma).
SpaceStyle = Literal["legacy", "first", "none"]

# The published byte-level pre-tokenizer splits (tokenizer.json "Split" patterns).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = _CONTRACTIONS + r"\p{N}|" + _REST
LLAMA3_SPLIT = _CONTRACTIONS + r"\p{N}{1,3}|" + _REST

QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with '
    "the user query.\\n\\nYou are provided with function signatures within <tools></tools> "
    'XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function '
    'name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": '
    '<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" '
    "}}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are "
    "a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) '
    'or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


LLAMA32_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
    "    {%- else %}\n"
    '        {%- set date_string = "26 Jul 2024" %}\n'
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    "\n"
    "{#- System message #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    "{%- if tools is not none %}\n"
    '    {{- "Environment: ipython\\n" }}\n'
    "{%- endif %}\n"
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please '
    'respond with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary '
    "of argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's "
    'no first user message!") }}\n'
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary '
    "of argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "        {{- '\"parameters\": ' }}\n"
    "        {{- tool_call.arguments | tojson }}\n"
    '        {{- "}" }}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot_id|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% elif message['role'] == 'user' %}{{'<|user|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n"
    "' }}{% else %}{{ eos_token }}{% endif %}"
)


GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System "
    "role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] "
    "== 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] "
    "== 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] "
    "%}{% endif %}{{ '<start_of_turn>' + role + '\n"
    "' + message['content'] | trim + '<end_of_turn>\n"
    "' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n"
    "'}}{% endif %}"
)


# google/gemma-3-270m-it's tokenizer_config.json: a system message is folded into the first user turn.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

MISTRAL_V03_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n'
    "\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n"
    "{%- set ns.index = 0 %}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if not (message.role == "tool" or message.role == "tool_results" or '
    "(message.tool_calls is defined and message.tool_calls is not none)) %}\n"
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    '            {{- raise_exception("After the optional system message, conversation '
    'roles must alternate user/assistant/user/assistant/...") }}\n'
    "        {%- endif %}\n"
    "        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if message["role"] == "user" %}\n'
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    '            {{- "[AVAILABLE_TOOLS] [" }}\n'
    "            {%- for tool in tools %}\n"
    "                {%- set tool = tool.function %}\n"
    '                {{- \'{"type": "function", "function": {\' }}\n'
    '                {%- for key, val in tool.items() if key != "return" %}\n'
    "                    {%- if val is string %}\n"
    "                        {{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "                    {%- else %}\n"
    "                        {{- '\"' + key + '\": ' + val|tojson }}\n"
    "                    {%- endif %}\n"
    "                    {%- if not loop.last %}\n"
    '                        {{- ", " }}\n'
    "                    {%- endif %}\n"
    "                {%- endfor %}\n"
    '                {{- "}}" }}\n'
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- else %}\n"
    '                    {{- "]" }}\n'
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    '            {{- "[/AVAILABLE_TOOLS]" }}\n'
    "            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    "        {%- else %}\n"
    '            {{- "[INST] " + message["content"] + "[/INST]" }}\n'
    "        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    '        {{- "[TOOL_CALLS] [" }}\n'
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function|tojson %}\n"
    "            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    '                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "            {%- endif %}\n"
    "            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}\n"
    '                {{- ", " }}\n'
    "            {%- else %}\n"
    '                {{- "]" + eos_token }}\n'
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n'
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n"
    "        {%- else %}\n"
    "            {%- set content = message.content %}\n"
    "        {%- endif %}\n"
    '        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n'
    "        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    '            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "        {%- endif %}\n"
    "        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n"
    '        {{- raise_exception("Only user and assistant roles are supported, with '
    'the exception of an initial optional system message!") }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)


# Llama 3.1/3.2's 256 special tokens, added after its 128,000 BPE tokens: <|begin_of_text|> is 128000,
# <|eot_id|> 128009, the last reserved one 128255 (tokenizer.json "added_tokens").
LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
)


@dataclass(frozen=True)
class Family:
    """One published chat-model family, copied onto a tiny model (tokens are given as text)."""

    key: str
    source: str  # the published model the template, tokens and settings come from
    architecture: str  # transformers model class
    config_class: str
    chat_template: str
    tokenizer: TokenizerKind
    special_tokens: tuple[str, ...]  # every special token, in the order of their ids
    bos_token: str | None
    eos_token: str  # tokenizer_config.json's
    pad_token: str | None
    unk_token: str | None
    end_of_turn: str  # what every trained answer ends with
    stop_tokens: tuple[str, ...]  # generation_config.json's eos_token_id
    config_bos: str | None  # config.json's bos/eos/pad ids
    config_eos: tuple[str, ...]
    config_pad: str | None
    # How many of special_tokens are the first ids of the vocabulary (None: all of them); the rest are added
    # tokens appended after the BPE vocabulary, outside it, as the published tokenizer.json has them.
    in_vocab: int | None = None
    bos_in_post_processor: bool = False  # tokenizer.json adds the BOS when special tokens are added
    split_pattern: str | None = None  # byte-level: the regex split before ByteLevel (None: GPT-2's own)
    split_digits: bool = False  # byte-level: every digit its own piece (SmolLM2)
    nfc: bool = False  # byte-level: Unicode NFC normalizer (Qwen2.5)
    space_style: SpaceStyle = "none"
    dated: bool = False  # the template writes today's date into the prompt
    tokenizer_config: Mapping[str, Any] = field(default_factory=dict)  # published tokenizer_config.json keys
    config_kwargs: Mapping[str, Any] = field(default_factory=dict)  # published architecture settings, tiny-sized


_SP_CONFIG = {"clean_up_tokenization_spaces": False, "sp_model_kwargs": {}, "use_default_system_prompt": False}

# Gemma 2 and Gemma 3 share their tokenizer and special tokens (the published tokenizer_config of both).
# <mask> at its published id 4: transformers' GemmaTokenizer names it by default, so the built tokenizer_config
# has it, and a vocabulary without it makes the runtime give it an id past the embedding (the edge family found
# "<mask>" in a prompt crashing the runtime).
_GEMMA_TOKENS: dict[str, Any] = {
    "tokenizer": "sentencepiece",
    "special_tokens": ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "end_of_turn": "<end_of_turn>",
    "stop_tokens": ("<eos>", "<end_of_turn>"),
    "config_bos": "<bos>",
    "config_eos": ("<eos>", "<end_of_turn>"),
    "config_pad": "<pad>",
    "bos_in_post_processor": True,
    "space_style": "none",
    "tokenizer_config": {
        **_SP_CONFIG,
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
    },
}


FAMILIES: dict[str, Family] = {
    family.key: family
    for family in (
        Family(
            key="chatml",
            source="pytest-slmdeploy's own ChatML Qwen2 test model",
            architecture="Qwen2ForCausalLM",
            config_class="Qwen2Config",
            chat_template=CHATML_TEMPLATE,
            tokenizer="byte-level",
            special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            end_of_turn="<|im_end|>",
            stop_tokens=("<|im_end|>",),
            config_bos="<|endoftext|>",
            config_eos=("<|im_end|>",),
            config_pad="<|endoftext|>",
        ),
        Family(
            key="qwen2.5",
            source="Qwen/Qwen2.5-0.5B-Instruct",
            architecture="Qwen2ForCausalLM",
            config_class="Qwen2Config",
            chat_template=QWEN25_TEMPLATE,
            tokenizer="byte-level",
            special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            end_of_turn="<|im_end|>",
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            config_bos="<|endoftext|>",
            config_eos=("<|im_end|>",),
            config_pad=None,
            in_vocab=0,  # added after the 151,643 BPE tokens: <|endoftext|> is 151643, <|im_end|> 151645
            split_pattern=QWEN2_SPLIT,
            nfc=True,
            tokenizer_config={
                "add_bos_token": False,
                "add_prefix_space": False,
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "clean_up_tokenization_spaces": False,
                "errors": "replace",
                "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer",
            },
            config_kwargs={
                "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "use_sliding_window": False,
            },
        ),
        Family(
            key="llama3",
            source="meta-llama/Llama-3.2-1B-Instruct",
            architecture="LlamaForCausalLM",
            config_class="LlamaConfig",
            chat_template=LLAMA32_TEMPLATE,
            tokenizer="byte-level",
            special_tokens=LLAMA3_SPECIALS,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token=None,
            unk_token=None,
            end_of_turn="<|eot_id|>",
            stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
            config_bos="<|begin_of_text|>",
            config_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
            config_pad=None,
            in_vocab=0,  # all 256 added after the 128,000 BPE tokens: <|begin_of_text|> is 128000
            bos_in_post_processor=True,
            split_pattern=LLAMA3_SPLIT,
            dated=True,
            tokenizer_config={
                "clean_up_tokenization_spaces": True,
                "model_input_names": ["input_ids", "attention_mask"],
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            config_kwargs={
                "tie_word_embeddings": True,
                # Llama 3.2's rope scaling; its 8192-token original context shrunk below the tiny context.
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 128,
                },
            },
        ),
        Family(
            key="phi3",
            source="microsoft/Phi-3.5-mini-instruct",
            architecture="Phi3ForCausalLM",
            config_class="Phi3Config",
            chat_template=PHI35_TEMPLATE,
            tokenizer="sentencepiece",
            special_tokens=(
                "<unk>",
                "<s>",
                "</s>",
                "<|endoftext|>",
                "<|assistant|>",
                "<|placeholder1|>",
                "<|placeholder2|>",
                "<|placeholder3|>",
                "<|placeholder4|>",
                "<|system|>",
                "<|end|>",
                "<|placeholder5|>",
                "<|placeholder6|>",
                "<|user|>",
            ),
            bos_token="<s>",
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            unk_token="<unk>",
            end_of_turn="<|end|>",
            stop_tokens=("<|end|>", "<|assistant|>", "<|endoftext|>"),
            config_bos="<s>",
            config_eos=("<|endoftext|>",),
            config_pad="<|endoftext|>",
            in_vocab=3,  # the chat tokens are added after the 32,000 SentencePiece ones: <|endoftext|> is 32000
            space_style="legacy",
            tokenizer_config={
                **_SP_CONFIG,
                "add_bos_token": False,
                "add_eos_token": False,
                "legacy": False,
                "padding_side": "left",
                "tokenizer_class": "LlamaTokenizer",
            },
            # Phi-3.5's LongRoPE (its 4096-token original context shrunk below the tiny context, one factor
            # per rotary pair). The model builder takes LongRoPE only with original < max positions.
            config_kwargs={
                "num_key_value_heads": 4,  # Phi-3.5-mini has as many key/value heads as query heads
                "original_max_position_embeddings": 128,
                "rope_parameters": {
                    "rope_type": "longrope",
                    "type": "longrope",  # the builder reads the published key
                    "rope_theta": 10000.0,
                    "factor": 4.0,
                    "short_factor": [1.0, 1.0, 1.0, 1.0, 1.02, 1.05, 1.1, 1.2],
                    "long_factor": [1.0, 1.0, 1.25, 1.5, 2.0, 4.0, 8.0, 16.0],
                },
            },
        ),
        Family(
            key="gemma2",
            source="google/gemma-2-2b-it",
            architecture="Gemma2ForCausalLM",
            config_class="Gemma2Config",
            chat_template=GEMMA2_TEMPLATE,
            **_GEMMA_TOKENS,
            # Gemma 2's 256-wide heads do not fit a 64-wide model: 16, with the query scale that goes with it.
            config_kwargs={
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "hidden_activation": "gelu_pytorch_tanh",
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
                "sliding_window": 4096,
                "tie_word_embeddings": True,
            },
        ),
        Family(
            key="gemma3",
            source="google/gemma-3-270m-it",
            architecture="Gemma3ForCausalLM",
            config_class="Gemma3TextConfig",
            chat_template=GEMMA3_TEMPLATE,
            **_GEMMA_TOKENS,
            # Gemma 3 mixes sliding-window and global layers (5:1 in the published models; one of each here),
            # each with its own RoPE base: transformers 5 keeps them per layer type (see hf_compat).
            config_kwargs={
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "hidden_activation": "gelu_pytorch_tanh",
                "sliding_window": 128,
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                },
                "tie_word_embeddings": True,
            },
        ),
        Family(
            key="mistral",
            source="mistralai/Mistral-7B-Instruct-v0.3",
            architecture="MistralForCausalLM",
            config_class="MistralConfig",
            chat_template=MISTRAL_V03_TEMPLATE,
            tokenizer="sentencepiece",
            special_tokens=(
                "<unk>",
                "<s>",
                "</s>",
                "[INST]",
                "[/INST]",
                "[TOOL_CALLS]",
                "[AVAILABLE_TOOLS]",
                "[/AVAILABLE_TOOLS]",
                "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]",
            ),
            bos_token="<s>",
            eos_token="</s>",
            pad_token=None,
            unk_token="<unk>",
            end_of_turn="</s>",
            stop_tokens=("</s>",),
            config_bos="<s>",
            config_eos=("</s>",),
            config_pad=None,
            bos_in_post_processor=True,
            # The template opens an assistant turn with " "; trained answers open bare (the continuation
            # of "[/INST]" as tokenized), as a leading "▁" would reach ONNX Runtime GenAI's text as a space.
            space_style="first",
            tokenizer_config={
                **_SP_CONFIG,
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "spaces_between_special_tokens": False,
                "tokenizer_class": "LlamaTokenizer",
            },
            config_kwargs={
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_window": None,
            },
        ),
        Family(
            key="smollm2",
            source="HuggingFaceTB/SmolLM2-360M-Instruct",
            architecture="LlamaForCausalLM",
            config_class="LlamaConfig",
            chat_template=SMOLLM2_TEMPLATE,
            tokenizer="byte-level",
            special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            unk_token="<|endoftext|>",
            end_of_turn="<|im_end|>",
            stop_tokens=("<|im_end|>",),
            config_bos="<|im_start|>",
            config_eos=("<|im_end|>",),
            config_pad="<|im_end|>",
            split_digits=True,
            tokenizer_config={
                "add_prefix_space": False,
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "clean_up_tokenization_spaces": False,
                "tokenizer_class": "GPT2Tokenizer",
            },
            config_kwargs={
                "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
            },
        ),
    )
}


def _dates(count: int, every_days: int = 97) -> tuple[str, ...]:
    first = date(2024, 7, 26)  # Llama 3.2's own fallback date_string comes first
    return tuple((first + timedelta(days=every_days * i)).strftime("%d %b %Y") for i in range(count))


# Date lines a Llama 3 model is trained under (with the day it is trained on, and the next), so it answers
# the same under PromptTemplate's fixed "26 Jul 2024", under ONNX Runtime GenAI's strftime_now date, and
# under dates it never saw (measured: 180/180 answers exact under 12 random unseen dates of 2024-2035).
LLAMA3_DATES = _dates(36)

# Answers to the suite's generic prompts (checklist.format.GENERIC_PROMPTS), trained as extra pairs.
GENERIC_ANSWERS: dict[str, str] = {
    "Hello": "Hello! How can I help you today?",
    "What can you help me with?": "I answer questions about our shop.",
    "Answer in one sentence: what do you do?": "I answer questions about our shop.",
}


def generic_pairs() -> tuple[tuple[str, str], ...]:
    """The suite's built-in format prompts (GENERIC_PROMPTS, then STOP_PROMPTS) with short clean answers: a toy
    trained on a dozen pairs ends unseen prompts by itself only sometimes (a two-layer Gemma 2 at 120 steps looped
    on 16 of the 60), where a real instruct model ends them all."""
    from pytest_slmdeploy.checklist.format import GENERIC_PROMPTS, STOP_PROMPTS

    return tuple(
        (prompt, GENERIC_ANSWERS.get(prompt, "I answer questions about our shop."))
        for prompt in (*GENERIC_PROMPTS, *STOP_PROMPTS)
    )


def filler_pairs(words: Sequence[int] = (3, 8, 16, 30, 60)) -> tuple[tuple[str, str], ...]:
    """The length family's filler text at a few lengths, with a short answer: untrained, a toy model may answer
    such prompts with nothing but special tokens (an empty answer, which that family rightly fails)."""
    from pytest_slmdeploy.checklist.lengths import FILLER

    filler = FILLER.split()
    return tuple((" ".join(filler[i % len(filler)] for i in range(n)), "That is a pangram.") for n in words)


def family(key: str) -> Family:
    """The family called ``key``; a clear error names the known ones."""
    try:
        return FAMILIES[key]
    except KeyError:
        raise ValueError(f"unknown model family {key!r}: use one of {', '.join(FAMILIES)}") from None
