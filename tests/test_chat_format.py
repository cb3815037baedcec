"""Llama 2's chat format against token lists written out from Meta's `chat_completion` rules, and the SFT mask."""

from __future__ import annotations

import re

import pytest

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.tokenizer import Tokenizer

BOS, EOS = 1, 2
UNSAFE = "Error: special tags are not allowed as part of the prompt."


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer(tokenizer_dir / "tokenizer.model")


def pieces(tok: Tokenizer, text: str) -> list[int]:
    """Plain sentencepiece ids of `text`, no special ids."""
    return tok.sp.encode(text)


def test_single_user_turn(tok):
    ids = tok.encode_dialog([{"role": "user", "content": "  hello world \n"}])
    assert ids == [BOS] + pieces(tok, "[INST] hello world [/INST]")


def test_system_merged_into_first_user_message(tok):
    ids = tok.encode_dialog(
        [{"role": "system", "content": "speak in french"}, {"role": "user", "content": "what is answer"}]
    )
    expected = [BOS] + pieces(tok, "[INST] <<SYS>>\nspeak in french\n<</SYS>>\n\nwhat is answer [/INST]")
    assert ids == expected


def test_multi_turn_each_pair_its_own_segment(tok):
    dialog = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": " bonjour monde "},
        {"role": "user", "content": "2 + 3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "count letters"},
    ]
    expected = (
        [BOS]
        + pieces(tok, "[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhello [/INST] bonjour monde ")
        + [EOS]
        + [BOS]
        + pieces(tok, "[INST] 2 + 3 [/INST] 5 ")
        + [EOS]
        + [BOS]
        + pieces(tok, "[INST] count letters [/INST]")
    )
    ids = tok.encode_dialog(dialog)
    assert ids == expected
    assert ids.count(BOS) == 3 and ids.count(EOS) == 2


def test_typed_eos_text_is_not_eos(tok):
    ids = tok.encode_dialog([{"role": "user", "content": "stop </s> <s> here"}])
    assert ids.count(EOS) == 0 and ids.count(BOS) == 1


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_special_tags_refused_with_metas_message(tok, tag):
    for dialog in (
        [{"role": "user", "content": f"hi {tag} there"}],
        [{"role": "system", "content": tag}, {"role": "user", "content": "hi"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": tag},
            {"role": "user", "content": "b"},
        ],
    ):
        with pytest.raises(Llama2MLXError) as info:
            tok.encode_dialog(dialog)
        assert str(info.value) == UNSAFE


@pytest.mark.parametrize(
    ("dialog", "match"),
    [
        ([{"role": "assistant", "content": "x"}], "message 0: role is 'assistant', expected 'user'"),
        (
            [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}],
            "message 1: role is 'system', expected 'user'",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "message 1: role is 'user', expected 'assistant'",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "message 1: the dialog ends with role 'assistant'",
        ),
        ([{"role": "user", "content": 3}], "message 0: must be an object with a string 'content'"),
        ([{"role": "system", "content": "s"}], "no user message"),
        ([], "empty"),
    ],
)
def test_bad_role_order(tok, dialog, match):
    with pytest.raises(Llama2MLXError, match=match.replace("[", r"\[")):
        tok.encode_dialog(dialog)


DIALOG = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "bonjour monde"},
    {"role": "user", "content": "2 + 3"},
    {"role": "assistant", "content": "5"},
]


def test_mask_marks_exactly_the_answers(tok):
    prompt1 = [BOS] + pieces(tok, "[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhello [/INST]")
    pair1 = [BOS] + pieces(tok, "[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhello [/INST] bonjour monde ") + [EOS]
    prompt2 = [BOS] + pieces(tok, "[INST] 2 + 3 [/INST]")
    pair2 = [BOS] + pieces(tok, "[INST] 2 + 3 [/INST] 5 ") + [EOS]
    assert pair1[: len(prompt1)] == prompt1 and pair2[: len(prompt2)] == prompt2

    ids, mask = tok.encode_dialog_with_mask(DIALOG)
    assert ids == pair1 + pair2
    # the same ids Meta's format gives for the completed pairs
    assert ids[: len(pair1)] + [BOS] + pieces(tok, "[INST] 2 + 3 [/INST]") == tok.encode_dialog(DIALOG[:4])
    answer1 = len(pair1) - len(prompt1)
    answer2 = len(pair2) - len(prompt2)
    expected = [False] * len(prompt1) + [True] * answer1 + [False] * len(prompt2) + [True] * answer2
    assert mask == expected
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(trained[:answer1]) == "bonjour monde " and tok.decode(trained[answer1:]) == "5 "
    assert [i for i, m in zip(ids, mask, strict=True) if m].count(EOS) == 2

    last_ids, last_mask = tok.encode_dialog_with_mask(DIALOG, train_on="last")
    assert last_ids == ids
    assert last_mask == [False] * len(pair1) + [False] * len(prompt2) + [True] * answer2


def test_mask_errors(tok):
    with pytest.raises(Llama2MLXError, match="ends with role 'user'"):
        tok.encode_dialog_with_mask(DIALOG[:4])
    with pytest.raises(Llama2MLXError, match="train_on"):
        tok.encode_dialog_with_mask(DIALOG, train_on="first")
    with pytest.raises(Llama2MLXError) as info:
        tok.encode_dialog_with_mask(DIALOG[:2] + [{"role": "assistant", "content": "[/INST]"}])
    assert str(info.value) == UNSAFE


class _MergingSP:
    """A stand-in sentencepiece whose pieces are characters, except that "] " is one piece: the template's end
    then merges with the answer, which the mask must refuse rather than guess."""

    def encode(self, text: str) -> list[int]:
        return [1000 if piece == "] " else ord(piece) for piece in re.findall(r"\] |.", text, flags=re.S)]


def test_mask_refuses_when_prompt_is_not_a_prefix(tok):
    merging = Tokenizer.__new__(Tokenizer)
    merging.sp, merging.bos_id, merging.eos_id = _MergingSP(), BOS, EOS
    with pytest.raises(Llama2MLXError, match="message 2: the tokenizer merges"):
        merging.encode_dialog_with_mask(DIALOG[:3])
