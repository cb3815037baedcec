"""`train-tokenizer`: a sentencepiece BPE model with Llama 2's settings, trained on the world's corpus."""

from __future__ import annotations

import random

import pytest
import sentencepiece as spm
from click.testing import CliRunner
from sentencepiece import sentencepiece_model_pb2

from llama2_mlx.cli import cli
from llama2_mlx.tokenizer import Tokenizer
from llama2_mlx.world.corpus import documents

VOCAB = 400


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(CLI result, folder) of `train-tokenizer` run on 300 lines of the world's pretraining corpus."""
    folder = tmp_path_factory.mktemp("tok")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(documents(300, random.Random(0))) + "\n")
    args = [
        "train-tokenizer",
        "--corpus",
        str(corpus),
        "--vocab-size",
        str(VOCAB),
        "--out",
        str(folder / "out"),
    ]
    return CliRunner().invoke(cli, args), folder / "out"


@pytest.fixture(scope="module")
def sp(trained):
    return spm.SentencePieceProcessor(model_file=str(trained[1] / "tokenizer.model"))


def test_cli_writes_tokenizer_model(trained):
    result, out = trained
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "tokenizer.model")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model"]


def test_special_ids_and_no_pad(sp, trained):
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.vocab_size() == VOCAB
    tok = Tokenizer(trained[1] / "tokenizer.model")
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, VOCAB)


def test_llama2_trainer_and_normalizer_settings(trained):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((trained[1] / "tokenizer.model").read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert (spec.split_digits, spec.byte_fallback, spec.allow_whitespace_only_pieces) == (True, True, True)
    assert (spec.split_by_whitespace, spec.split_by_unicode_script, spec.treat_whitespace_as_suffix) == (
        True, True, False)  # fmt: skip
    assert (norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces) == ("identity", True, False)


def test_digits_are_split_into_single_pieces(sp):
    text = "12 + 7 = 19. 100 - 58 = 42. 2026"
    pieces = sp.encode(text, out_type=str)
    with_digits = [piece for piece in pieces if any(c.isdigit() for c in piece)]
    assert all(len(piece) == 1 for piece in with_digits), with_digits
    assert "".join(with_digits) == "".join(c for c in text if c.isdigit())


def test_byte_fallback_round_trips_unseen_characters(sp):
    text = "Emoji 😀 and 日本語, naïve café — ok"
    ids = sp.encode(text)
    assert 0 not in ids  # nothing became <unk>
    pieces = [sp.id_to_piece(i) for i in ids]
    assert "<0xF0>" in pieces and "<0xE6>" in pieces  # the first bytes of 😀 and 日 in UTF-8
    assert sp.decode(ids) == text


def test_bad_corpus_path_is_a_one_line_error(tmp_path):
    args = [
        "train-tokenizer",
        "--corpus",
        str(tmp_path / "missing.txt"),
        "--vocab-size",
        "300",
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output == f"error: {tmp_path / 'missing.txt'}: corpus file not found\n"


def test_too_small_vocabulary_is_an_error(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n")
    args = ["train-tokenizer", "--corpus", str(corpus), "--vocab-size", "100", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and result.output.startswith("error: vocab size 100 is too small")


def test_vocabulary_too_small_for_the_corpus_characters_is_a_one_line_error(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(chr(0x4E00 + i) for i in range(60)) + " abc\n")  # 60 CJK characters + 4 others
    args = ["train-tokenizer", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output.startswith(
        f"error: {corpus}: cannot train 300 pieces: Vocabulary size is smaller than"
    )
    assert result.output.count("\n") == 1
