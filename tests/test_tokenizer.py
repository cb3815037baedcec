"""The sentencepiece wrapper: round trips, BOS/EOS only as structure, byte fallback."""

from __future__ import annotations

import pytest

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer(tokenizer_dir / "tokenizer.model")


def test_special_ids_and_vocab(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 384)
    assert tok.id_to_piece(1) == "<s>" and tok.id_to_piece(2) == "</s>"


def test_encode_adds_bos_eos_only_when_asked(tok):
    body = tok.sp.encode("hello world")
    assert tok.encode("hello world") == [1] + body
    assert tok.encode("hello world", bos=False, eos=True) == body + [2]
    assert tok.encode("hello world", bos=False) == body
    assert tok.decode(tok.encode("hello world", bos=True, eos=True)) == "hello world"


def test_typed_special_tokens_stay_text(tok):
    ids = tok.encode("say </s> and <s> now", bos=False)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == "say </s> and <s> now"


def test_byte_fallback_round_trip(tok):
    text = "ß∑ 🦙 ok"  # none of these characters is in the training corpus
    ids = tok.encode(text, bos=False)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)
    assert 0 not in ids  # byte fallback, never <unk>
    assert tok.decode(ids) == text


def test_missing_or_bad_model_file(tmp_path):
    with pytest.raises(Llama2MLXError, match="not found"):
        Tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(Llama2MLXError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")
