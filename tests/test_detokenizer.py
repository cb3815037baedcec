"""Streaming detokenization: multi-byte characters appear whole and the stream equals `Tokenizer.decode`."""

from __future__ import annotations

import random

import pytest

from llama2_mlx.detokenizer import StreamingDetokenizer
from llama2_mlx.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer(tokenizer_dir / "tokenizer.model")


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tok)
    return [detok.add(i) for i in ids] + [detok.finish()]


def test_emoji_over_byte_tokens_appears_whole(tok):
    text = " hello 🦙 ß∑ world 日本語 café"  # 🦙, ß and ∑ are not in the vocabulary: byte fallback
    ids = tok.encode(text, bos=True, eos=True)
    llama = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in "🦙".encode()]
    start = next(i for i in range(len(ids)) if ids[i : i + 4] == llama)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[start : start + 4] == ["", "", "", "🦙"]


def test_leading_space_marker(tok):
    ids = tok.encode("hello world", bos=True)
    pieces = stream(tok, ids)
    assert "".join(pieces) == "hello world"
    assert pieces[0] == "" and pieces[1] == ""  # BOS, then "▁" whose space is sentencepiece's dummy prefix
    # an answer decoded on its own loses the leading space of its first piece, exactly like decode()
    answer = tok.encode(" 5 plus 3", bos=False)
    assert "".join(stream(tok, answer)) == tok.decode(answer)


def test_random_id_sequences_match_decode(tok):
    """Arbitrary ids, broken byte sequences and control ids included: one U+FFFD per stray byte, as decode()."""
    rng = random.Random(0)
    lead_bytes = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in (0xE2, 0xF0, 0x9F, 0x80, 0xFF)]
    for _ in range(500):
        ids = [rng.choice([rng.randrange(tok.vocab_size), rng.choice(lead_bytes), rng.choice((0, 1, 2))])
               for _ in range(rng.randint(0, 8))]  # fmt: skip
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids
