"""A chat session: the history of one conversation in Llama 2's format, answered by streaming generation.

The CLI's `chat` REPL only reads lines and prints chunks; the history rules live here. An answer stopped early
(Ctrl-C) is kept as far as it was shown, so the dialog still alternates user/assistant. When the context fills up,
the oldest whole user/assistant pairs that generation had to drop are removed from the history for good.
"""

from __future__ import annotations

from collections.abc import Iterator

from llama2_mlx.generation import GenerationChunk, stream_generate
from llama2_mlx.model import Llama
from llama2_mlx.sampling import fresh_seed
from llama2_mlx.tokenizer import Message, Tokenizer, check_no_special_tags


class ChatSession:
    def __init__(
        self,
        model: Llama,
        tok: Tokenizer,
        system: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ):
        self.model, self.tok = model, tok
        self.sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        # the n-th answer samples with seed + n: a given seed repeats a whole session; /reset repeats no sample
        self.seed = fresh_seed() if seed is None else seed
        self.questions_asked = 0
        self.history: list[Message] = []
        self.system: str | None = None
        self.set_system(system)

    def set_system(self, text: str | None) -> None:
        """Set (or, with None or "", clear) the system prompt; the conversation starts over."""
        if text:
            check_no_special_tags(text)
        self.system = text or None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.history = []

    @property
    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def ask(self, text: str) -> Iterator[GenerationChunk]:
        """Stream the answer to `text`; the exchange joins the history once any of the answer was produced."""
        question = {"role": "user", "content": text}
        self.questions_asked += 1
        answer: list[str] = []
        dropped = None
        try:
            for chunk in stream_generate(
                self.model,
                self.tok,
                self.messages + [question],
                seed=self.seed + self.questions_asked,
                **self.sampling,
            ):
                dropped = chunk.stats.dropped_turns
                answer.append(chunk.text)
                yield chunk
        finally:
            if dropped is not None:
                del self.history[: 2 * dropped]
                self.history += [question, {"role": "assistant", "content": "".join(answer)}]
