"""Meta checkpoints built with torch (MP=1 multi-head, MP=2 grouped-query) convert to folders whose logits equal the
PyTorch port of Meta's model.py; every malformed input is one clear error that leaves DST untouched."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import llama2_mlx as L
from llama2_mlx.checkpoints.convert import convert
from llama2_mlx.cli import cli
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model_folder import load_model
from tests.checkpoint_builders import meta_reference, write_meta_folder
from tests.conftest import TOKENIZER_VOCAB

MHA = dict(dim=64, n_layers=2, n_heads=4, vocab_size=TOKENIZER_VOCAB, multiple_of=32, norm_eps=1e-5)
GQA = dict(
    dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=TOKENIZER_VOCAB, multiple_of=32, norm_eps=1e-5
)
TOKENS = [[1, 306, 4, 77, 300, 2, 9, 100, 383, 12, 45], [1, 17, 17, 250, 3, 99, 380, 0, 5, 64, 7]]


def _max_error(folder, reference: torch.nn.Module) -> tuple[float, float]:
    ours = np.array(load_model(folder)(mx.array(TOKENS)))
    theirs = reference(torch.tensor(TOKENS)).numpy()
    return float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())


def _assert_logits_match(folder, reference) -> None:
    error, scale = _max_error(folder, reference)
    assert error <= 1e-4 * max(1.0, scale), (error, scale)


@pytest.fixture(scope="module")
def mha_reference():
    return meta_reference(MHA, seed=0)


@pytest.fixture(scope="module")
def gqa_reference():
    return meta_reference(GQA, seed=1)


@pytest.fixture
def meta_mp1(tmp_path, mha_reference, tokenizer_dir):
    return write_meta_folder(tmp_path / "llama-2-7b", MHA, mha_reference.state_dict(), 1, tokenizer_dir)


@pytest.fixture
def meta_mp2(tmp_path, gqa_reference, tokenizer_dir):
    return write_meta_folder(tmp_path / "llama-2-70b", GQA, gqa_reference.state_dict(), 2, tokenizer_dir)


def test_mp1_float32_matches_meta_reference(meta_mp1, mha_reference, tmp_path):
    reports = []
    result = L.convert(meta_mp1, tmp_path / "out", progress=lambda *report: reports.append(report))
    _assert_logits_match(tmp_path / "out", mha_reference)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (
        4,
        4,
        192,
    )
    assert config["vocab_size"] == TOKENIZER_VOCAB  # params.json said -1
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (meta_mp1 / "tokenizer.model").read_bytes()
    assert result.dtype == "float32" and result.quantization is None
    assert result.parameters == sum(p.numel() for p in mha_reference.parameters())
    checkpoint_bytes = 4 * result.parameters  # float32
    assert [done for _, done, _ in reports] == sorted(done for _, done, _ in reports)
    assert reports[-1][1:] == (checkpoint_bytes, checkpoint_bytes)
    assert {name for name, _, _ in reports} == set(mx.load(str(tmp_path / "out" / "model.safetensors")))


def test_interrupted_convert_leaves_destination_as_it_was(meta_mp1, tmp_path, mha_reference):
    def interrupt(name, done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(meta_mp1, tmp_path / "new", progress=interrupt)
    convert(meta_mp1, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(KeyboardInterrupt):
        convert(meta_mp1, tmp_path / "old", dtype="float16", force=True, progress=interrupt)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-2-7b", "old"]  # no temporary folders left


def test_mp2_gqa_bfloat16_stays_bfloat16_and_matches(
    meta_mp2, gqa_reference, tmp_path, tokenizer_dir, monkeypatch
):
    # tiny blocks: every tensor streams in several row blocks (wq/wk in whole heads, wo/w2 stitched from 2 shards)
    monkeypatch.setattr("llama2_mlx.checkpoints.convert.BLOCK_BYTES", 1000)
    state = {k: v.to(torch.bfloat16) for k, v in gqa_reference.state_dict().items()}
    bf16 = write_meta_folder(tmp_path / "bf16", GQA, state, 2, tokenizer_dir, dtype=torch.bfloat16)
    shard = torch.load(bf16 / "consolidated.01.pth")
    assert shard["layers.0.attention.wq.weight"].shape == (32, 64)  # 4 query heads per shard
    assert shard["layers.0.attention.wk.weight"].shape == (8, 64)  # 1 KV head per shard
    convert(bf16, tmp_path / "out", max_shard_bytes=40_000)  # forces several output shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    file = tmp_path / "out" / index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    stored = mx.load(str(file))
    assert stored["model.layers.1.self_attn.k_proj.weight"].dtype == mx.bfloat16
    with safe_open(file, "pt") as reader:  # the reference safetensors library reads our streamed shards too
        for name in reader.keys():
            expected = np.array(stored[name].astype(mx.float32))
            np.testing.assert_array_equal(reader.get_tensor(name).float().numpy(), expected)
    # the reference with the same bf16-rounded weights, computed in float32 like our CPU load
    rounded = meta_reference(GQA)
    rounded.load_state_dict({k: v.float() for k, v in state.items()})
    _assert_logits_match(tmp_path / "out", rounded)


def test_conversion_never_imports_torch(meta_mp2, tmp_path, gqa_reference):
    """Run in a fresh interpreter where `import torch` fails: the converter must not need it."""
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from llama2_mlx.checkpoints.convert import convert\n"
        f"convert({str(meta_mp2)!r}, {str(tmp_path / 'out')!r})\n"
        "assert 'torch' not in {name.split('.')[0] for name, module in sys.modules.items() if module}\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1])
    _assert_logits_match(tmp_path / "out", gqa_reference)


def test_dtype_option_and_rope_freqs_ignored(tmp_path, gqa_reference, tokenizer_dir):
    state = dict(gqa_reference.state_dict()) | {"rope.freqs": torch.ones(4)}
    meta = write_meta_folder(tmp_path / "meta", GQA, state, 2, tokenizer_dir)
    result = convert(meta, tmp_path / "out", dtype="float16")
    assert result.dtype == "float16"
    stored = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert all(a.dtype == mx.float16 for a in stored.values()) and "rope.freqs" not in stored
    error, scale = _max_error(tmp_path / "out", gqa_reference)
    assert error <= 2e-2 * max(1.0, scale), (error, scale)  # float16 rounding of the weights only


def test_tokenizer_found_in_parent_and_vocab_from_params(tmp_path, mha_reference, tokenizer_dir):
    meta = write_meta_folder(
        tmp_path / "dl" / "7b", MHA, mha_reference.state_dict(), 1, params_vocab=TOKENIZER_VOCAB
    )
    shutil.copy(tokenizer_dir / "tokenizer.model", tmp_path / "dl" / "tokenizer.model")
    convert(meta, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    _assert_logits_match(tmp_path / "out", mha_reference)


def test_verify_checklist(meta_mp2, tmp_path):
    convert(meta_mp2, tmp_path / "ok", verify=True)
    data = bytearray((meta_mp2 / "consolidated.01.pth").read_bytes())
    data[-2000] ^= 0xFF  # a flipped bit deep in tensor data: the zip still opens, only md5 can tell
    (meta_mp2 / "consolidated.01.pth").write_bytes(bytes(data))
    with pytest.raises(Llama2MLXError, match=r"consolidated\.01\.pth: md5 \w+ does not match checklist\.chk"):
        convert(meta_mp2, tmp_path / "bad", verify=True)
    (meta_mp2 / "checklist.chk").unlink()
    with pytest.raises(Llama2MLXError, match=r"checklist\.chk: missing"):
        convert(meta_mp2, tmp_path / "bad", verify=True)


def _rewrite_shard(folder, index, change) -> None:
    path = folder / f"consolidated.{index:02d}.pth"
    state = torch.load(path)
    change(state)
    torch.save(state, path)


def _set(name, value):
    return lambda state: state.__setitem__(name, value)


BAD_INPUTS = {
    "missing tensor": (
        lambda f: _rewrite_shard(f, 1, lambda s: s.pop("layers.1.feed_forward.w3.weight")),
        r"consolidated\.01\.pth: missing tensor layers\.1\.feed_forward\.w3\.weight",
    ),
    "extra tensor": (
        lambda f: _rewrite_shard(f, 0, _set("layers.2.attention.wq.weight", torch.zeros(32, 64))),
        r"consolidated\.00\.pth: unexpected tensor layers\.2\.attention\.wq\.weight",
    ),
    "shards disagree on shape": (
        lambda f: _rewrite_shard(f, 1, _set("layers.0.attention.wv.weight", torch.zeros(8, 48))),
        r"shards disagree on layers\.0\.attention\.wv\.weight: consolidated\.00\.pth has shape \(8, 64\), "
        r"consolidated\.01\.pth has \(8, 48\)",
    ),
    "shards disagree on dtype": (
        lambda f: _rewrite_shard(f, 1, lambda s: s.__setitem__("output.weight", s["output.weight"].half())),
        r"shards disagree on output\.weight: consolidated\.00\.pth holds float32, consolidated\.01\.pth holds float16",
    ),
    "replicated norm differs": (
        lambda f: _rewrite_shard(f, 1, _set("norm.weight", torch.full((64,), 3.0))),
        r"shards disagree on replicated tensor norm\.weight: consolidated\.01\.pth differs",
    ),
    "missing shard": (
        lambda f: (f / "consolidated.01.pth").unlink(),
        r"found 1 consolidated\.\*\.pth file\(s\) but the tensor shapes .* imply 2",
    ),
    "truncated shard": (
        lambda f: (f / "consolidated.01.pth").write_bytes((f / "consolidated.01.pth").read_bytes()[:5000]),
        r"consolidated\.01\.pth: not a readable PyTorch zip checkpoint .*truncated",
    ),
    "wrong file": (
        lambda f: (f / "consolidated.00.pth").write_text("<html>403 Forbidden</html>"),
        r"consolidated\.00\.pth: not a readable PyTorch zip checkpoint",
    ),
    "vocab disagrees with params": (
        lambda f: (f / "params.json").write_text(json.dumps(GQA | {"vocab_size": 32000})),
        r"params\.json: vocab_size 32000 disagrees with the weights/tokenizer \(384\)",
    ),
    "vocab disagrees with tokenizer": (
        lambda f: [_rewrite_shard(f, i, _set("tok_embeddings.weight", torch.zeros(400, 32))) for i in (0, 1)],
        r"tokenizer\.model: tokenizer has 384 pieces but tok_embeddings has 400 rows",
    ),
    "wrong layer count": (
        lambda f: (f / "params.json").write_text(json.dumps(GQA | {"vocab_size": -1, "n_layers": 3})),
        r"consolidated\.00\.pth: missing tensor layers\.2\.",
    ),
    "no params": (lambda f: (f / "params.json").unlink(), r"params\.json: missing"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_fail_cleanly_and_leave_no_output(case, meta_mp2, tmp_path):
    damage, message = BAD_INPUTS[case]
    damage(meta_mp2)
    with pytest.raises(Llama2MLXError, match=message):
        convert(meta_mp2, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-2-70b"]  # no DST, no temporary folder


def test_empty_and_unknown_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Llama2MLXError, match=r"empty: neither a Meta checkpoint .* nor a Hugging Face one"):
        convert(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(Llama2MLXError, match=r"nowhere/at/all: no such file or folder"):
        convert(tmp_path / "nowhere" / "at" / "all", tmp_path / "out")


def test_existing_destination_needs_force(meta_mp1, tmp_path, mha_reference):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(Llama2MLXError, match=r"out: already exists \(use --force to overwrite\)"):
        convert(meta_mp1, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    convert(meta_mp1, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    _assert_logits_match(tmp_path / "out", mha_reference)


def test_cli_convert_summary_and_errors(meta_mp2, tmp_path, gqa_reference):
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(meta_mp2), str(tmp_path / "out"), "--verify"])
    assert result.exit_code == 0, result.output
    summary = result.stdout.strip().splitlines()[-1]
    parameters = sum(p.numel() for p in gqa_reference.parameters())
    assert summary.startswith(f"wrote {tmp_path / 'out'}: {parameters:,} parameters, float32, ")
    assert summary.endswith(" s") and " KB on disk, " in summary
    _assert_logits_match(tmp_path / "out", gqa_reference)

    again = runner.invoke(cli, ["convert", str(meta_mp2), str(tmp_path / "out")])
    assert again.exit_code == 1
    assert again.stderr.strip() == f"error: {tmp_path / 'out'}: already exists (use --force to overwrite)"
    usage = runner.invoke(cli, ["convert", str(meta_mp2), str(tmp_path / "x"), "--quantize", "3"])
    assert usage.exit_code == 2
