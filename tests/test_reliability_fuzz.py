"""Fuzzing the project's readers (issue 13): random and mutated safetensors headers, .pth pickles and zip layouts,
config/params/adapter JSON and JSON Lines rows. Each case must either read or fail with `Llama2MLXError`: any
other exception is a traceback the user would see. A SIGALRM per test turns a hang into a failure. Derandomized,
so every run tries the same cases; each test prints how many it ran."""

from __future__ import annotations

import io
import json
import signal
import struct
import zipfile
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2_mlx.checkpoints.pth import read_pth
from llama2_mlx.checkpoints.safetensors_file import load_safetensors, read_safetensors
from llama2_mlx.config import ModelArgs
from llama2_mlx.data import DataReport, EncodeOptions, read_examples
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.lora import read_adapter_config
from llama2_mlx.model_folder import read_quantization
from llama2_mlx.tokenizer import Tokenizer

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))  # fmt: skip


@contextmanager
def no_hang(seconds: int = 60):
    def fail(signum, frame):
        raise TimeoutError(f"a reader hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def only_clean_errors(read, counter: list[int]) -> None:
    counter[0] += 1
    try:
        read()
    except Llama2MLXError as error:
        assert "\n" not in str(error).strip(), str(error)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U8", "U32", "U64", "BOOL", "Q4", ""]
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(DTYPES) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-8, 80), min_size=0, max_size=3) | json_values,
    },
)


def safetensors_bytes(header, data: bytes, length_delta: int = 0) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data


def test_fuzz_safetensors_headers(tmp_path, capsys):
    path = tmp_path / "x.safetensors"
    count = [0]

    @FUZZ
    @given(
        header=st.dictionaries(st.text(max_size=4), entry, max_size=3) | json_values,
        data=st.binary(max_size=80),
        length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]),
    )
    def case(header, data, length_delta):
        path.write_bytes(safetensors_bytes(header, data, length_delta))
        only_clean_errors(lambda: read_safetensors(path), count)
        only_clean_errors(lambda: [a.sum().item() for a in load_safetensors(path).values()], count)

    with no_hang():
        case()
    with capsys.disabled():
        print(f"\nsafetensors header fuzz: {count[0]} reads")
    assert count[0] >= 300


def test_fuzz_mutated_safetensors_files(tmp_path, tiny_model_dir, capsys):
    original = (tiny_model_dir / "model.safetensors").read_bytes()[:4096]
    path = tmp_path / "x.safetensors"
    count = [0]

    @FUZZ
    @given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6),
           st.integers(8, 4096))  # fmt: skip
    def case(flips, cut):
        data = bytearray(original)
        for position, value in flips:
            data[position] = value
        path.write_bytes(bytes(data[:cut]))
        only_clean_errors(lambda: read_safetensors(path), count)

    with no_hang():
        case()
    with capsys.disabled():
        print(f"\nmutated safetensors fuzz: {count[0]} reads")
    assert count[0] >= 150


@pytest.fixture(scope="module")
def pth_bytes():
    buffer = io.BytesIO()
    torch.save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)},
               buffer)  # fmt: skip
    return buffer.getvalue()


def test_fuzz_pth_bytes_and_zip_layouts(tmp_path, pth_bytes, capsys):
    path = tmp_path / "x.pth"
    count = [0]
    with zipfile.ZipFile(io.BytesIO(pth_bytes)) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    pickle_name = next(name for name in members if name.endswith("data.pkl"))

    @FUZZ
    @given(
        flips=st.lists(st.tuples(st.integers(0, len(pth_bytes) - 1), st.integers(0, 255)), max_size=4),
        pickle_flips=st.lists(
            st.tuples(st.integers(0, len(members[pickle_name]) - 1), st.integers(0, 255)), max_size=3
        ),  # fmt: skip
        drop=st.sampled_from([None, *members]),
        cut=st.integers(0, len(pth_bytes)),
        layout=st.booleans(),
    )
    def case(flips, pickle_flips, drop, cut, layout):
        if layout:  # a rebuilt archive: a member dropped, the pickle's bytes changed
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
                for name, content in members.items():
                    if name == drop:
                        continue
                    if name == pickle_name:
                        content = bytearray(content)
                        for position, value in pickle_flips:
                            content[position] = value
                    archive.writestr(name, bytes(content))
            data = buffer.getvalue()
        else:  # the file's own bytes flipped and cut
            data = bytearray(pth_bytes)
            for position, value in flips:
                data[position] = value
            data = bytes(data[: max(cut, len(pth_bytes) // 2)])
        path.write_bytes(data)
        only_clean_errors(lambda: [t.load().sum().item() for t in read_pth(path).values()], count)

    with no_hang():
        case()
    with capsys.disabled():
        print(f"\n.pth fuzz: {count[0]} reads")
    assert count[0] >= 150


HF_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
           "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings", "head_dim",
           "model_type", "rope_scaling", "rope_parameters", "quantization"]  # fmt: skip
META_KEYS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "max_seq_len"]  # fmt: skip
GOOD_HF = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 160, "vocab_size": 384, "rms_norm_eps": 1e-5}  # fmt: skip
GOOD_META = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5}
small_numbers = st.sampled_from(
    [0, -1, 1, 2, 3, 64, 2**40, 1.5, "64", "1e-5", None, [], {}, True, float("nan")]
)


def test_fuzz_config_params_adapter_json(tmp_path, capsys):
    count = [0]
    adapter = tmp_path / "adapter"
    adapter.mkdir()

    @FUZZ
    @given(
        hf=st.dictionaries(st.sampled_from(HF_KEYS), small_numbers | json_values, max_size=4),
        meta=st.dictionaries(st.sampled_from(META_KEYS), small_numbers | json_values, max_size=4),
        adapter_config=st.dictionaries(
            st.sampled_from(["rank", "alpha", "dropout", "targets", "layers", "fine_tune_type"]),
            small_numbers | json_values,
            max_size=4,
        )
        | json_values,  # fmt: skip
        vocab=st.sampled_from([None, 384, 0, -1]),
    )
    def case(hf, meta, adapter_config, vocab):
        only_clean_errors(lambda: ModelArgs.from_hf_config({**GOOD_HF, **hf}, "config.json"), count)
        only_clean_errors(lambda: ModelArgs.from_hf_config(hf, "config.json"), count)
        only_clean_errors(lambda: read_quantization({**GOOD_HF, **hf}, "config.json"), count)
        only_clean_errors(
            lambda: ModelArgs.from_meta_params({**GOOD_META, **meta}, vocab, "params.json"), count
        )
        (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
        only_clean_errors(lambda: read_adapter_config(adapter), count)

    with no_hang():
        case()
    with capsys.disabled():
        print(f"\nconfig/params/adapter JSON fuzz: {count[0]} reads")
    assert count[0] >= 750


def test_fuzz_jsonl_rows(tmp_path, tokenizer_dir, capsys):
    tok = Tokenizer(tokenizer_dir / "tokenizer.model")
    path = tmp_path / "d.jsonl"
    count = [0]
    message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "x"])
                                                  | json_values, "content": st.text(max_size=10) | json_values})  # fmt: skip
    row = (
        st.fixed_dictionaries({}, optional={"messages": st.lists(message, max_size=4) | json_values})
        | st.fixed_dictionaries(
            {},
            optional={
                "prompt": st.text(max_size=10) | json_values,
                "completion": st.text(max_size=10) | json_values,
            },
        )  # fmt: skip
        | st.fixed_dictionaries({}, optional={"text": st.text(max_size=10) | json_values})
        | json_values
    )
    line = row.map(lambda r: json.dumps(r).encode()) | st.binary(max_size=20)

    @FUZZ
    @given(lines=st.lists(line, min_size=1, max_size=4), options=st.builds(EncodeOptions))
    def case(lines, options):
        path.write_bytes(b"\n".join(lines) + b"\n")
        for skip in (False, True):
            only_clean_errors(lambda skip=skip: read_examples(path, tok, options, DataReport(), skip), count)

    with no_hang():
        case()
    with capsys.disabled():
        print(f"\nJSON Lines fuzz: {count[0]} reads")
    assert count[0] >= 300
