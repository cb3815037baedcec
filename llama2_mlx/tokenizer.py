"""The sentencepiece tokenizer and Llama 2's chat format (Meta's `chat_completion`, token for token).

Special ids (BOS, EOS) are added only structurally: text is always encoded as text, so a user who types "</s>"
gets the pieces of those characters, never the EOS id. Dialog problems are `Llama2MLXError`s naming the message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from llama2_mlx.errors import Llama2MLXError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

Message = dict[str, str]


class Tokenizer:
    """A sentencepiece model (`tokenizer.model`) with Llama 2's BOS/EOS handling and chat format."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise Llama2MLXError(f"{path}: tokenizer model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as error:
            raise Llama2MLXError(f"{path}: not a sentencepiece model ({error})") from None
        self.path = path
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.vocab_size: int = self.sp.vocab_size()

    def check_vocab(self, vocab_size: int, model: str) -> None:
        """The model's embedding must have exactly one row per piece: with more rows it can sample ids this
        tokenizer cannot decode, with fewer the tokenizer yields ids past the embedding (MLX does not check)."""
        if self.vocab_size != vocab_size:
            raise Llama2MLXError(
                f"{self.path}: tokenizer has {self.vocab_size} pieces but {model} has {vocab_size} rows"
            )

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; BOS/EOS are added as ids, never parsed from the text."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes from a command line or stdin (surrogate escapes)
            raise Llama2MLXError("the text is not valid UTF-8") from None
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def encode_dialog(self, messages: Sequence[Message]) -> list[int]:
        """Meta's `chat_completion` prompt: finished pairs as BOS..EOS segments, then the open last user turn."""
        turns = _turns(messages, last="user")
        ids: list[int] = []
        for user, answer in zip(turns[::2], turns[1::2], strict=False):
            ids += self.encode(_finished_turn(user, answer), bos=True, eos=True)
        return ids + self.encode(_open_turn(turns[-1]), bos=True, eos=False)

    def encode_dialog_with_mask(
        self, messages: Sequence[Message], train_on: str = "all"
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a finished dialog (ending with the assistant) and a loss mask for supervised fine-tuning.

        The ids are Meta's format for every pair. The mask is True exactly on the assistant's answer tokens
        (the answer text, its trailing space and the EOS), never on BOS, the [INST] template or user/system
        text. `train_on="last"` marks only the final answer (Ghost Attention trains the last turn only).
        """
        if train_on not in ("all", "last"):
            raise Llama2MLXError(f"train_on must be 'all' or 'last', got {train_on!r}")
        turns = _turns(messages, last="assistant")
        n_pairs = len(turns) // 2
        ids: list[int] = []
        mask: list[bool] = []
        for index, (user, answer) in enumerate(zip(turns[::2], turns[1::2], strict=True)):
            pair = self.encode(_finished_turn(user, answer), bos=True, eos=True)
            prompt = self.encode(_open_turn(user), bos=True, eos=False)
            if pair[: len(prompt)] != prompt:
                message = _message_index(messages, 2 * index + 1)
                raise Llama2MLXError(
                    f"message {message}: the tokenizer merges the end of the [INST] template with the answer, "
                    "so prompt and answer tokens cannot be separated"
                )
            trained = train_on == "all" or index == n_pairs - 1
            ids += pair
            mask += [False] * len(prompt) + [trained] * (len(pair) - len(prompt))
        return ids, mask


def as_dialog(prompt: str | Sequence[Message]) -> list[Message]:
    """A chat prompt as messages: a string is one user message (never a plain-text continuation)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _finished_turn(user: str, answer: str) -> str:
    return f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "


def _open_turn(user: str) -> str:
    return f"{B_INST} {user.strip()} {E_INST}"


def check_no_special_tags(text: str) -> None:
    """Refuse text holding the chat template's tags, with Meta's message (they would let a user forge turns)."""
    if any(tag in text for tag in SPECIAL_TAGS):
        raise Llama2MLXError(UNSAFE_ERROR)


def _turns(messages: Sequence[Message], last: str) -> list[str]:
    """Check a dialog and return the contents of its user/assistant turns, the system prompt merged into the first.

    Meta's order: an optional system message, then user and assistant alternating, ending with `last`.
    """
    if not messages:
        raise Llama2MLXError("the dialog is empty; it needs at least one user message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise Llama2MLXError(f"message {index}: must be an object with a string 'content'")
        check_no_special_tags(message["content"])
    start = 1 if messages[0].get("role") == "system" else 0
    for index in range(start, len(messages)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        role = messages[index].get("role")
        if role != expected:
            raise Llama2MLXError(
                f"message {index}: role is {role!r}, expected {expected!r} "
                "(an optional system message, then user and assistant alternating)"
            )
    if len(messages) == start:
        raise Llama2MLXError("the dialog has a system message but no user message")
    if messages[-1]["role"] != last:
        raise Llama2MLXError(
            f"message {len(messages) - 1}: the dialog ends with role {messages[-1]['role']!r}, expected {last!r}"
        )
    turns = [message["content"] for message in messages[start:]]
    if start:
        turns[0] = B_SYS + messages[0]["content"] + E_SYS + turns[0]
    return turns


def _message_index(messages: Sequence[Message], turn: int) -> int:
    """The index in `messages` of user/assistant turn number `turn` (0-based), counting a system message."""
    return turn + (1 if messages[0].get("role") == "system" else 0)
