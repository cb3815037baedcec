"""Llama 2's chat format as a Jinja chat template, for tools that read `tokenizer_config.json` (mlx-lm, transformers).

`Tokenizer.encode_dialog` is the reference; this template renders the same ids through `apply_chat_template`:
the system prompt merged into the first user turn, each finished pair as `<s>[INST] user [/INST] answer </s>`,
the open user turn without EOS, contents stripped, and the special tags refused with Meta's message. A dialog
ending with the assistant renders its finished pairs (the ids `encode_dialog_with_mask` trains on). One
difference: contents holding "<s>" or "</s>" are refused here, where `encode_dialog` encodes them as text.
The text is Meta's exactly; the ids also depend on the tool's tokenizer: transformers 5 tokenizes Llama 2's
vocabulary with the `tokenizers` BPE, which splits runs of spaces differently from Meta's sentencepiece
("a  b"), so only text without such runs gets identical ids from it (tests/test_chat_template.py).
"""

from __future__ import annotations

from llama2_mlx.tokenizer import B_SYS, E_SYS, SPECIAL_TAGS, UNSAFE_ERROR

_ROLE_ERROR = (
    "a dialog is an optional system message, then user and assistant alternating, starting with the user"
)

# The rendered text is tokenized again, where "<s>" and "</s>" would become BOS/EOS ids and let a message forge
# turns; Meta encodes them as text, which a text template cannot express, so the template refuses them.
_SPECIAL_TOKEN_ERROR = "messages must not contain the BOS or EOS token text (<s>, </s>)"

CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- if not turns -%}{{ raise_exception('the dialog needs at least one user message') }}{%- endif -%}"
    "{%- for message in messages -%}{%- for tag in " + repr(list(SPECIAL_TAGS)) + " -%}"
    "{%- if tag in message['content'] -%}{{ raise_exception('" + UNSAFE_ERROR + "') }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if bos_token in message['content'] or eos_token in message['content'] -%}"
    "{{ raise_exception('" + _SPECIAL_TOKEN_ERROR + "') }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{ raise_exception('" + _ROLE_ERROR + "') }}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if loop.first and system is not none -%}"
    "{%- set content = " + repr(B_SYS) + " + system + " + repr(E_SYS) + " + content -%}{%- endif -%}"
    "{{- bos_token + '[INST] ' + content | trim + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + message['content'] | trim + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def with_chat_template(tokenizer_config: dict) -> dict:
    """`tokenizer_config` with Llama 2's template added, unless it already has one (an HF source's own wins)."""
    if tokenizer_config.get("chat_template"):
        return tokenizer_config
    return tokenizer_config | {"chat_template": CHAT_TEMPLATE}
