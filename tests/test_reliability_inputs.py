"""Issue 13, items 9-14: silently wrong results become refusals, and bad input is one line, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import mlx.core as mx
import pytest
from click.testing import CliRunner

from llama2_mlx.cli import cli
from llama2_mlx.config import ModelArgs
from llama2_mlx.data import Batcher, DataReport, EncodeOptions, Example
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model_folder import save_model
from llama2_mlx.tokenizer import Tokenizer
from tests.conftest import random_model, tiny_args

CLI = [sys.executable, "-c", "from llama2_mlx.cli import main; main()"]


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in output, output
    return lines[-1]


def model_copy(tmp_path, tiny_model_dir, name="model"):
    folder = tmp_path / name
    shutil.copytree(tiny_model_dir, folder)
    return folder


def test_9_tokenizer_size_must_match_the_model(tmp_path, tokenizer_dir):
    for vocab in (400, 300):  # more rows than pieces, and fewer
        folder = tmp_path / f"v{vocab}"
        save_model(random_model(tiny_args(vocab_size=vocab)), folder, tokenizer_dir=tokenizer_dir)
        line = one_error_line(invoke("generate", folder, "--prompt", "hi").output)
        assert line.endswith(f"tokenizer has 384 pieces but the model's embedding ({folder}/config.json) has "
                             f"{vocab} rows")  # fmt: skip
        line = one_error_line(invoke("convert", folder, tmp_path / f"out{vocab}").output)
        assert "tokenizer has 384 pieces" in line and not (tmp_path / f"out{vocab}").exists()


def test_10_examples_whose_answer_is_cut_away_are_left_out(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir / "tokenizer.model")
    long_prompt = {"prompt": "the quick brown fox " * 20, "completion": "yes"}
    short = {"prompt": "hi", "completion": "hello world"}
    report = DataReport()
    examples = [Example(*_encode(row, tok)) for row in (long_prompt, short)]
    batcher = Batcher(examples, batch_size=1, seq_len=32, report=report)
    assert len(batcher.examples) == 1 and report.untrained == 1 and report.truncated == 1
    assert "1 left out: --seq-len cut away all of their answer" in report.summary()
    with pytest.raises(Exception, match="--seq-len 32 cuts away the trained part"):
        Batcher(examples[:1], batch_size=1, seq_len=32, report=DataReport())


def _encode(row, tok):
    from llama2_mlx.data import encode_row

    example = encode_row(row, tok, EncodeOptions())
    return example.ids, example.mask


def test_10_sft_cli_skips_them_with_a_count(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "the quick brown fox " * 20, "completion": "yes"},
        {"prompt": "hi", "completion": "hello"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("sft", tiny_model_dir, "--data", data, "--out", tmp_path / "o", "--iters", "2",
                    "--batch-size", "1", "--seq-len", "32", "--lr", "1e-3", "--no-progress")  # fmt: skip
    assert result.exit_code == 0 and "1 left out: --seq-len cut away all of their answer" in result.output


def write_safetensors(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_11_14_bad_safetensors_are_refused(tmp_path, tiny_model_dir):
    folder = model_copy(tmp_path, tiny_model_dir)
    weights = folder / "model.safetensors"
    cases = {
        "negative offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 8,
                             "data_offsets must be two non-negative integers"),
        "overlapping": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
                        "tensors 'a' and 'b' overlap"),
        "wrong JSON type": ({"a": [1, 2]}, b"", "expected an object with dtype, shape and data_offsets"),
        "header a list": ([1], b"", "the header is not a JSON object"),
        "shape strings": ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, b"\0" * 8,
                          "shape must be a list of non-negative integers"),
        "F64": ({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8,
                "tensor a has dtype float64; expected one of"),
        "int weights": ({"a": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4,
                        "tensor a has dtype int32"),
    }  # fmt: skip
    for name, (header, data, message) in cases.items():
        write_safetensors(weights, header, data)
        line = one_error_line(invoke("generate", folder, "--prompt", "hi").output)
        assert str(weights) in line and message in line, (name, line)
    weights.unlink()
    weights.mkdir()  # a directory named x.safetensors
    assert "not a regular file" in one_error_line(invoke("generate", folder, "--prompt", "hi").output)
    weights.rmdir()
    os.mkfifo(weights)  # a FIFO: reading it would block for ever
    command = [*CLI, "generate", str(folder), "--prompt", "hi"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not a regular file" in one_error_line(result.stderr)


def test_11_export_of_a_folder_missing_a_tensor_is_refused(tmp_path, tiny_model_dir):
    folder = model_copy(tmp_path, tiny_model_dir)
    weights = mx.load(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    line = one_error_line(invoke("export", folder, tmp_path / "hf").output)
    assert (
        line.endswith("missing tensor model.layers.1.mlp.up_proj.weight") and not (tmp_path / "hf").exists()
    )


def test_11_convert_refuses_integer_weights_bad_tokenizers_and_no_tokenizer(tmp_path, tiny_model_dir):
    folder = model_copy(tmp_path, tiny_model_dir)
    (folder / "tokenizer.model").write_bytes(b"corrupt")
    line = one_error_line(invoke("convert", folder, tmp_path / "a").output)
    assert "tokenizer.model: not a sentencepiece model" in line
    (folder / "tokenizer.model").unlink()
    line = one_error_line(invoke("convert", folder, tmp_path / "a").output)
    assert "no tokenizer.model beside the weights" in line
    shutil.copy(tiny_model_dir / "tokenizer.model", folder / "tokenizer.model")
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"].astype(mx.int32)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    line = one_error_line(invoke("convert", folder, tmp_path / "a").output)
    assert "tensor model.norm.weight has dtype int32" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_11_rope_theta_must_be_positive(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for theta in (0, -1.0):
        with pytest.raises(Exception, match="'rope_theta' must be a positive number"):
            ModelArgs.from_hf_config({**config, "rope_theta": theta}, "x/config.json")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("hidden_size", None, "missing required field(s) hidden_size"),
        ("hidden_size", "64", "'hidden_size' must be a non-negative integer, got '64'"),
        ("num_attention_heads", 0, "'num_attention_heads' must be a positive integer, got 0"),
        ("num_attention_heads", 3, "hidden_size 64 is not divisible by num_attention_heads 3"),
        ("num_key_value_heads", [2], "'num_key_value_heads' must be a non-negative integer, got [2]"),
        ("rms_norm_eps", "1e-5", "'rms_norm_eps' must be a number, got '1e-5'"),
        ("vocab_size", 10**12, "'vocab_size' is 1000000000000, absurdly large"),
        ("tie_word_embeddings", "no", "'tie_word_embeddings' must be true or false, got 'no'"),
        ("quantization", [4], "'quantization' must be an object, got [4]"),
        (
            "quantization",
            {"group_size": 0, "bits": 4},
            "'quantization.group_size' must be one of 32, 64, 128, got 0",
        ),
        (
            "quantization",
            {"group_size": 64, "bits": "4"},
            "'quantization.bits' must be one of 2, 3, 4, 6, 8, got '4'",
        ),
    ],
)
def test_13_config_json_types_name_the_key(tmp_path, tiny_model_dir, key, value, message):
    folder = model_copy(tmp_path, tiny_model_dir)
    config = json.loads((folder / "config.json").read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    line = one_error_line(invoke("generate", folder, "--prompt", "hi").output)
    assert line == f"error: {folder / 'config.json'}: {message}", line


@pytest.mark.parametrize(
    "params, message",
    [
        ({"dim": "64"}, "'dim' must be a non-negative integer"),
        ({"multiple_of": 0}, "'multiple_of' must be a positive integer, got 0"),
        ({"n_heads": None}, "'n_heads' must be a positive integer, got None"),
        ({"norm_eps": [1]}, "'norm_eps' must be a number"),
        ({"rope_theta": 0}, "'rope_theta' must be a positive number"),
    ],
)
def test_13_params_json_types_name_the_key(params, message):
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5}
    with pytest.raises(Exception) as error:
        ModelArgs.from_meta_params({**base, **params}, 384, source="params.json")
    assert str(error.value).startswith("params.json: ") and message in str(error.value), str(error.value)


def test_13_14_adapter_files(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    adapter = tmp_path / "adapter"
    result = invoke("sft", tiny_model_dir, "--data", data, "--out", adapter, "--iters", "1", "--batch-size", "1",
                    "--seq-len", "32", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "rank": "8"}))
    line = one_error_line(invoke("generate", tiny_model_dir, "--adapter", adapter, "--prompt", "hi").output)
    assert "adapter_config.json" in line and "rank" in line, line
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapters.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json}      ")
    line = one_error_line(invoke("generate", tiny_model_dir, "--adapter", adapter, "--prompt", "hi").output)
    assert "adapters.safetensors: cannot read safetensors (corrupt header" in line


def test_14_corrupt_trainer_state_on_resume(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    out = tmp_path / "run"
    args = ["sft", tiny_model_dir, "--data", data, "--out", out, "--iters", "1", "--batch-size", "1",
            "--seq-len", "32", "--no-progress"]  # fmt: skip
    assert invoke(*args).exit_code == 0
    state = out / "checkpoint" / "trainer_state.json"
    good = state.read_text()
    for bad in ("{", '{"step": "1"}', "[]", json.dumps({**json.loads(good), "rng_key": [1]})):
        state.write_text(bad)
        line = one_error_line(invoke(*args, "--iters", "2", "--resume").output)
        assert str(state) in line, line
    state.write_text(good)
    (out / "checkpoint" / "optimizer.safetensors").write_bytes(b"\0" * 3)
    line = one_error_line(invoke(*args, "--iters", "2", "--resume").output)
    assert "optimizer.safetensors: cannot read safetensors" in line


def test_12_non_utf8_input(tmp_path, tiny_model_dir):
    bad = b"caf\xe9\n"
    data = tmp_path / "d.jsonl"
    data.write_bytes(
        json.dumps({"text": "hello world"}).encode() + b"\n" + b'{"text": "' + bad[:-1] + b'"}\n'
    )
    sft = ["sft", tiny_model_dir, "--data", data, "--out", tmp_path / "run", "--iters", "1", "--batch-size", "1",
           "--seq-len", "32", "--no-progress"]  # fmt: skip
    assert one_error_line(invoke(*sft).output).startswith(f"error: {data}:2: not UTF-8 text")
    result = invoke(*sft, "--skip-bad-lines")
    assert result.exit_code == 0 and f"1 bad lines skipped (first: {data}:2: not UTF-8 text)" in result.output
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"hello\n" + bad)
    tokenizer = tiny_model_dir / "tokenizer.model"
    result = invoke("pretrain", "--config", "tiny", "--data", corpus, "--tokenizer", tokenizer, "--out",
                    tmp_path / "p", "--iters", "1")  # fmt: skip
    assert one_error_line(result.output) == f"error: {corpus}:2: not UTF-8 text"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_bytes(b"lr: 1e-4\n# " + bad)
    assert "not UTF-8 text" in one_error_line(invoke(*sft, "-c", yaml_file).output)
    # chat answers the line after a bad one; a non-UTF-8 --prompt is one line
    result = subprocess.run([*CLI, "chat", str(tiny_model_dir), "--max-tokens", "2"],
                            input=b"h\xe9llo\nhi\n", capture_output=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and b"error: the text is not valid UTF-8" in result.stderr, result.stderr
    assert result.stdout.strip(), "no answer to the second line"
    result = subprocess.run(
        [*CLI, "generate", str(tiny_model_dir), "--prompt", b"h\xe9llo"], capture_output=True
    )
    assert result.returncode == 1 and result.stderr.strip() == b"error: the text is not valid UTF-8"


def test_12_non_utf8_checklist(tmp_path, tiny_model_dir):
    from llama2_mlx.checkpoints.meta import verify_checklist

    (tmp_path / "checklist.chk").write_bytes(b"\xff\xfe\n")
    with pytest.raises(Exception, match=r"checklist\.chk:1: not UTF-8 text"):
        verify_checklist(tmp_path)


def test_null_required_config_field_is_named_not_a_type_error():
    """A config.json with `"num_attention_heads": null` and a head_dim (found by the fuzz test, Hypothesis 6.170).

    Guards against: a null required field passing the presence check and failing later with a TypeError."""
    config = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": None, "intermediate_size": 160,
              "vocab_size": 384, "head_dim": 16}  # fmt: skip
    with pytest.raises(
        Llama2MLXError, match="config.json: .num_attention_heads. must be a positive integer, got None"
    ):
        ModelArgs.from_hf_config(config, "config.json")
