"""Streaming detokenization: text as tokens arrive, equal in the end to `Tokenizer.decode` of all of them.

Re-decoding the whole answer after every token costs O(n^2); instead each piece is turned into text once, following
sentencepiece's own decoding rules: "▁" is a space, the first text piece loses its leading "▁" (the dummy prefix),
control ids (BOS/EOS) print nothing, `<unk>` prints " ⁇ ", and byte-fallback pieces (<0xF0><0x9F>...) are held
until they complete a UTF-8 character, so an emoji split over several tokens appears whole, never as U+FFFD.
Bytes that cannot form a character become one U+FFFD each, as sentencepiece does.
"""

from __future__ import annotations

import codecs
import functools

from llama2_mlx.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
_SPACE = "\u2581"


def _utf8_length(lead: int) -> int:
    """Bytes in the UTF-8 sequence a lead byte starts (1 for an invalid lead: it becomes one U+FFFD)."""
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 1


def _is_valid_prefix(chunk: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(chunk, final=False)
    except UnicodeDecodeError:
        return False
    return True


@functools.lru_cache(maxsize=4)
def _surfaces(tok: Tokenizer) -> tuple[str | int | None, ...]:
    """Per id, computed once per tokenizer: None for control ids, the byte of a byte piece, else the text."""
    sp = tok.sp
    surfaces: list[str | int | None] = []
    for token_id in range(tok.vocab_size):
        if sp.is_control(token_id):
            surfaces.append(None)
        elif sp.is_byte(token_id):
            surfaces.append(int(sp.id_to_piece(token_id)[1:-1], 16))
        elif sp.is_unknown(token_id):
            surfaces.append(" \u2047 ")
        else:
            surfaces.append(sp.id_to_piece(token_id).replace(_SPACE, " "))
    return tuple(surfaces)


class StreamingDetokenizer:
    """Feed token ids one at a time with `add`; each call returns the text that is final so far."""

    def __init__(self, tok: Tokenizer):
        self._surface = _surfaces(tok)
        self._unk_id = tok.sp.unk_id()
        self._pending = bytearray()
        self._started = False

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a multi-byte character is still arriving)."""
        surface = self._surface[token_id]
        if surface is None:
            return self._drain(final=True)
        if isinstance(surface, int):
            self._started = True
            self._pending.append(surface)
            return self._drain(final=False)
        text = self._drain(final=True)
        if not self._started and surface.startswith(" ") and token_id != self._unk_id:
            surface = surface[1:]
        self._started = True
        return text + surface

    def finish(self) -> str:
        """Whatever is still held (an unfinished byte sequence, one U+FFFD per byte)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> str:
        out = []
        while self._pending:
            chunk = bytes(self._pending[: _utf8_length(self._pending[0])])
            if len(chunk) == _utf8_length(chunk[0]):
                try:
                    out.append(chunk.decode("utf-8"))
                    del self._pending[: len(chunk)]
                    continue
                except UnicodeDecodeError:
                    pass
            elif not final and _is_valid_prefix(chunk):
                break  # the rest of the character is still to come
            out.append(REPLACEMENT)
            del self._pending[:1]
        return "".join(out)
