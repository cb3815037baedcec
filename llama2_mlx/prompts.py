"""Prompt rows for rejection sampling and PPO: `{"prompt": str}` or `{"messages": [..., user]}`, optionally
`"safety": true` (a safety prompt, for the paper's reward rule). Every row is checked against the chat format and
the context before any sampling starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.tokenizer import Message, as_dialog


@dataclass
class PromptRow:
    """A prompt to answer: a string or a dialog ending with a user turn, and whether it is a safety prompt."""

    prompt: str | list[Message]
    safety: bool = False

    @property
    def text(self) -> str:
        """What a reward function receives: the prompt string, or the dialog's last user message."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1]["content"]

    def record(self) -> dict[str, Any]:
        return {"prompt": self.prompt} if isinstance(self.prompt, str) else {"messages": self.prompt}

    @property
    def messages(self) -> list[Message]:
        """The prompt as a chat (a string prompt is one user message, never a plain-text continuation)."""
        return as_dialog(self.prompt)

    def dialog(self, answer: str) -> list[Message]:
        return [*self.messages, {"role": "assistant", "content": answer}]


def parse_prompt(row: Any) -> PromptRow:
    if not isinstance(row, dict):
        raise Llama2MLXError(f"expected a JSON object, got {type(row).__name__}")
    if ("prompt" in row) == ("messages" in row):
        raise Llama2MLXError('a prompt row needs exactly one of "prompt" or "messages"')
    prompt = row.get("prompt", row.get("messages"))
    if isinstance(prompt, str) and not prompt.strip():
        raise Llama2MLXError("'prompt' is empty")
    if not isinstance(prompt, str | list) or not prompt:
        raise Llama2MLXError("'prompt' must be a string, 'messages' a non-empty list")
    if not isinstance(row.get("safety", False), bool):
        raise Llama2MLXError("'safety' must be true or false")
    return PromptRow(prompt, row.get("safety", False))


def read_prompts(path: Path, tokenizer, max_seq_len: int, max_tokens: int, skip_bad_lines: bool = False):
    """Prompt rows of a .jsonl file, each checked against the chat format and the context (file:line errors)."""
    from llama2_mlx.data import DataReport, read_rows
    from llama2_mlx.generation import encode_prompt

    def parse(row: Any) -> PromptRow:
        prompt = parse_prompt(row)
        encode_prompt(
            tokenizer, prompt.messages, max_seq_len, max_tokens
        )  # role order, tags, fits the context
        return prompt

    return read_rows(path, parse, DataReport(), skip_bad_lines)
