"""SFT data: the three formats, loss masks on a hand-built dialog, bad lines by file:line, batching and packing."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from llama2_mlx.data import Batcher, DataReport, EncodeOptions, Example, encode_row, load_sft_data, pack
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer(tokenizer_dir / "tokenizer.model")


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


DIALOG = [
    {"role": "system", "content": "answer in capitals"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "WORLD"},
    {"role": "user", "content": "what is 2 + 2"},
    {"role": "assistant", "content": "FOUR"},
]


def test_dialog_mask_covers_answers_and_eos_only(tok):
    example = encode_row({"messages": DIALOG}, tok, EncodeOptions())
    first = tok.encode("[INST] <<SYS>>\nanswer in capitals\n<</SYS>>\n\nhello [/INST]", bos=True)
    first_pair = tok.encode(
        "[INST] <<SYS>>\nanswer in capitals\n<</SYS>>\n\nhello [/INST] WORLD ", bos=True, eos=True
    )
    second = tok.encode("[INST] what is 2 + 2 [/INST]", bos=True)
    second_pair = tok.encode("[INST] what is 2 + 2 [/INST] FOUR ", bos=True, eos=True)
    assert example.ids == first_pair + second_pair
    expected = [False] * len(first) + [True] * (len(first_pair) - len(first))
    expected += [False] * len(second) + [True] * (len(second_pair) - len(second))
    assert example.mask == expected
    assert (
        tok.decode([i for i, m in zip(example.ids, example.mask, strict=True) if m and i != tok.eos_id])
        == "WORLD  FOUR "
    )
    assert example.ids[len(first_pair) - 1] == tok.eos_id and example.mask[len(first_pair) - 1]

    gatt = encode_row({"messages": DIALOG}, tok, EncodeOptions(gatt=True))
    assert gatt.ids == example.ids
    assert gatt.mask == [False] * len(first_pair) + expected[len(first_pair) :]

    everything = encode_row({"messages": DIALOG}, tok, EncodeOptions(train_on_prompt=True))
    assert everything.mask == [False] + [True] * (len(example.ids) - 1)


def test_text_and_completion_formats(tok):
    text = encode_row({"text": "hello world"}, tok, EncodeOptions())
    assert text.ids == tok.encode("hello world", bos=True, eos=True)
    assert text.mask == [False] + [True] * (len(text.ids) - 1)
    row = {"prompt": "what is 2 + 2", "completion": " 4"}
    completion = encode_row(row, tok, EncodeOptions())
    prompt_ids = tok.encode("what is 2 + 2", bos=True)
    assert completion.ids == prompt_ids + tok.encode(" 4", bos=False, eos=True)
    assert completion.mask == [False] * len(prompt_ids) + [True] * (len(completion.ids) - len(prompt_ids))
    # Guards against: train_on_prompt ignored for completions (it is left at its default everywhere else)
    everything = encode_row(row, tok, EncodeOptions(train_on_prompt=True))
    assert everything.ids == completion.ids and everything.mask == [False] + [True] * (
        len(completion.ids) - 1
    )


@pytest.mark.parametrize(
    "line,problem",
    [
        ("{not json", "not valid JSON"),
        ('{"input": "x"}', "unknown shape with keys ['input']"),
        (
            '{"messages": [{"role": "assistant", "content": "hi"}]}',
            "message 0: role is 'assistant', expected 'user'",
        ),
        (
            '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}',
            "message 0: empty content",
        ),
        ('{"prompt": "p", "completion": ""}', "'completion' is empty"),
        ('{"text": 5}', "'text' must be a string"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, tok, line, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, "", line])
    with pytest.raises(Llama2MLXError) as error:
        load_sft_data(path, tok, EncodeOptions())
    assert str(error.value).startswith(f"{path}:3: ")
    assert problem in str(error.value)


def test_skip_bad_lines_counts_them(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, "{bad", {"text": "two"}, {"x": 1}])
    train, valid, report = load_sft_data(path, tok, EncodeOptions(), skip_bad_lines=True)
    assert len(train) == 2 and valid == [] and len(report.skipped) == 2
    assert report.skipped[1].startswith(f"{path}:4: unknown shape")


def test_folder_with_valid_file_and_valid_fraction(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"row {i}"} for i in range(10)])
    train, valid, _ = load_sft_data(tmp_path, tok, EncodeOptions(), valid_fraction=0.2)
    assert (len(train), len(valid)) == (8, 2)
    # the held-out rows are chosen by the seed. Guards against: a split that ignores the seed
    held = {seed: {tok.decode(e.ids) for e in load_sft_data(tmp_path, tok, EncodeOptions(), 0.3, seed)[1]}
            for seed in range(4)}  # fmt: skip
    assert len({frozenset(rows) for rows in held.values()}) > 1
    assert {tok.decode(e.ids) for e in load_sft_data(tmp_path, tok, EncodeOptions(), 0.3, 2)[1]} == held[2]
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "held out"}])
    train, valid, _ = load_sft_data(tmp_path, tok, EncodeOptions(), valid_fraction=0.2)
    assert (len(train), len(valid)) == (10, 1)


def example(length: int, start: int = 10) -> Example:
    return Example(list(range(start, start + length)), [False] + [True] * (length - 1))


def test_pack_fills_rows_with_whole_examples():
    assert pack([3, 4, 2, 5, 1], 7) == [[3, 2], [1, 0], [4]]  # best fit, longest first
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=200).tolist()
    rows = pack(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert sum(lengths) / (512 * len(rows)) > 0.93  # next-fit in random order fills about 75%


def test_unpacked_batches_sorted_by_length_and_padded():
    examples = [example(n) for n in (5, 40, 7, 33)]
    batcher = Batcher(examples, batch_size=2, seq_len=64, seed=0)
    batches = list(batcher.once())
    tokens, mask, docs, positions = batches[0].inputs
    assert tokens.shape == (2, 32) and batches[0].tokens == 12 and docs is None
    # the loss positions: targets 1..4 of row 0 (flat 0..3) and 1..6 of row 1 (31..36), padded to 64 with -1
    assert np.array(positions).tolist() == [0, 1, 2, 3, 31, 32, 33, 34, 35, 36] + [-1] * 54
    assert np.array(tokens)[0, :5].tolist() == list(range(10, 15)) and np.array(tokens)[0, 5:].sum() == 0
    assert np.array(mask)[0].tolist() == [False] + [True] * 4 + [False] * 27
    assert batches[1].inputs[0].shape == (2, 64)  # 33 and 40, padded to a multiple of 32


def test_validation_subset_spreads_over_lengths():
    batcher = Batcher([example(n) for n in range(4, 44)], batch_size=4, seq_len=64)
    widths = [b.inputs[0].shape[1] for b in batcher.once(limit=3)]
    assert len(list(batcher.once())) == 10 and widths == [32, 32, 64]
    assert [b.tokens for b in batcher.once(limit=3)] == [
        4 + 5 + 6 + 7,
        20 + 21 + 22 + 23,
        40 + 41 + 42 + 43,
    ]  # batches 0, 4, 9


def test_truncation_is_counted():
    report = DataReport()
    batcher = Batcher([example(50), example(10)], batch_size=2, seq_len=32, report=report)
    assert report.truncated == 1 and next(batcher.once()).inputs[0].shape == (2, 32)


def test_packed_batch_has_document_ids():
    batcher = Batcher(
        [example(3), example(4), example(5)], batch_size=1, seq_len=8, packing=True, seed=0, pad_to=8
    )
    rows = [b.inputs for b in batcher.once()]
    assert all(len(inputs) == 4 for inputs in rows)
    docs = [np.array(inputs[2])[0].tolist() for inputs in rows]
    lengths = sorted(tuple(d.count(i) for i in range(max(d) + 1)) for d in docs)
    assert sorted(sum(lengths, ())) == [3, 4, 5]
    assert all(d[-1] == -1 or sum(1 for x in d if x >= 0) == 8 for d in docs)


def test_restart_at_any_position_and_rank_slices():
    examples = [example(n) for n in range(4, 24)]
    batcher = Batcher(examples, batch_size=4, seq_len=64, seed=3)
    stream = batcher(0)
    first = [next(stream) for _ in range(12)]  # crosses into the third epoch (5 batches each)
    again = batcher(7)
    assert all(mx.array_equal(next(again).inputs[0], b.inputs[0]) for b in first[7:])
    ranks = [Batcher(examples, batch_size=4, seq_len=64, seed=3, rank=r, world_size=2)(0) for r in (0, 1)]
    whole = batcher(0)
    for _ in range(6):
        expected = sorted(np.array(next(whole).inputs[0]).sum(1).tolist())
        got = sorted(sum((np.array(next(s).inputs[0]).sum(1).tolist() for s in ranks), []))
        assert got == expected


def test_each_epoch_is_a_different_permutation_of_the_batches():
    """Four epochs of six one-example batches: each epoch visits every batch once, in an order of its own; the
    same seed repeats the orders and another seed changes them.

    Guards against: every epoch visiting the batches in the same order (a seed that ignores the epoch).
    """
    examples = [example(n, start=n) for n in range(4, 10)]  # batch identity = its length

    def epochs(seed: int) -> list[tuple[int, ...]]:
        stream = Batcher(examples, batch_size=1, seq_len=64, seed=seed)(0)
        lengths = [next(stream).tokens for _ in range(24)]
        return [tuple(lengths[i : i + 6]) for i in range(0, 24, 6)]

    orders = epochs(seed=7)
    assert all(sorted(order) == list(range(4, 10)) for order in orders)
    assert len(set(orders)) == 4
    assert epochs(seed=7) == orders and epochs(seed=8) != orders
