"""Hugging Face folders written by transformers (safetensors, sharded or not, and pytorch_model*.bin through the
torch-free reader) convert to folders whose logits equal transformers' own LlamaForCausalLM."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama2_mlx.checkpoints.convert import convert
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model_folder import load_model
from tests.conftest import TOKENIZER_VOCAB

TOKENS = [[1, 306, 4, 77, 300, 2, 9, 100, 383, 12, 45], [1, 17, 17, 250, 3, 99, 380, 0, 5, 64, 7]]


def hf_model(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=tie)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init so that logits are far from zero
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.randn_like(parameter) * (0.2 if name.endswith("norm.weight") else 0.08))
            if name.endswith("norm.weight"):
                parameter.add_(1.0)
    return model.eval()


def _assert_logits_match(folder, model: LlamaForCausalLM) -> None:
    ours = np.array(load_model(folder)(mx.array(TOKENS)))
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits.float().numpy()
    error, scale = float(np.abs(ours - theirs).max()), float(np.abs(theirs).max())
    assert error <= 1e-4 * max(1.0, scale), (error, scale)


@pytest.fixture(scope="module")
def model():
    return hf_model()


def _save(model, folder, tokenizer_dir, **kwargs):
    model.save_pretrained(folder, **kwargs)
    shutil.copy(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")
    return folder


def test_safetensors_folder(model, tmp_path, tokenizer_dir):
    source = _save(model, tmp_path / "hf", tokenizer_dir)
    result = convert(source, tmp_path / "out")
    _assert_logits_match(tmp_path / "out", model)
    assert result.dtype == "float32"
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    assert result.parameters == sum(p.numel() for p in model.parameters())


def test_sharded_safetensors_folder(model, tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr("llama2_mlx.checkpoints.convert.BLOCK_BYTES", 1000)  # several row blocks per tensor
    source = _save(model, tmp_path / "hf", tokenizer_dir, max_shard_size="100KB")
    assert len(list(source.glob("*.safetensors"))) > 1
    convert(source, tmp_path / "out")
    _assert_logits_match(tmp_path / "out", model)


def test_sharded_pytorch_bin_bfloat16(model, tmp_path, tokenizer_dir):
    """Old-style `pytorch_model-0000k-of-0000n.bin` (torch.save of the state dict), read without torch."""
    source = tmp_path / "hf"
    source.mkdir()
    model.config.save_pretrained(source)
    shutil.copy(tokenizer_dir / "tokenizer.model", source / "tokenizer.model")
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(
        8
    )  # older checkpoints carried this buffer
    names = sorted(state)
    torch.save({k: state[k] for k in names[:10]}, source / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in names[10:]}, source / "pytorch_model-00002-of-00002.bin")
    result = convert(source, tmp_path / "out")
    assert result.dtype == "bfloat16"
    stored = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert stored["model.norm.weight"].dtype == mx.bfloat16 and not any("inv_freq" in k for k in stored)
    rounded = hf_model()
    rounded.load_state_dict({k: v.float() for k, v in state.items() if "inv_freq" not in k})
    _assert_logits_match(tmp_path / "out", rounded)


def test_tied_embeddings(tmp_path, tokenizer_dir):
    tied = hf_model(seed=3, tie=True)
    convert(_save(tied, tmp_path / "hf", tokenizer_dir), tmp_path / "out")
    assert "lm_head.weight" not in mx.load(str(tmp_path / "out" / "model.safetensors"))
    _assert_logits_match(tmp_path / "out", tied)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_duplicated_missing_and_misshaped_tensors(model, tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    model.config.save_pretrained(source)
    state = _state(model)
    save_file(state, source / "model-00001-of-00002.safetensors")
    save_file({"model.norm.weight": state["model.norm.weight"]}, source / "model-00002-of-00002.safetensors")
    with pytest.raises(
        Llama2MLXError, match=r"00002-of-00002\.safetensors: tensor model\.norm\.weight is also in"
    ):
        convert(source, tmp_path / "out")

    (source / "model-00002-of-00002.safetensors").unlink()
    save_file(
        {k: v for k, v in state.items() if k != "lm_head.weight"}, source / "model-00001-of-00002.safetensors"
    )
    with pytest.raises(Llama2MLXError, match=r"hf: missing tensor lm_head\.weight"):
        convert(source, tmp_path / "out")

    save_file(state | {"model.extra.weight": torch.ones(2)}, source / "model-00001-of-00002.safetensors")
    with pytest.raises(Llama2MLXError, match=r"hf: unexpected tensor model\.extra\.weight"):
        convert(source, tmp_path / "out")

    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"intermediate_size": 192}))
    save_file(state, source / "model-00001-of-00002.safetensors")
    with pytest.raises(Llama2MLXError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight has shape \(64, 160\), "
                       r"the config expects \(64, 192\)"):  # fmt: skip
        convert(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_corrupt_safetensors_and_no_weights(model, tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    model.config.save_pretrained(source)
    with pytest.raises(Llama2MLXError, match=r"hf: no \*\.safetensors or pytorch_model\*\.bin weights found"):
        convert(source, tmp_path / "out")
    (source / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(Llama2MLXError, match=r"model\.safetensors: cannot read safetensors"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [1, 100])
def test_truncated_safetensors_is_refused(model, tmp_path, tokenizer_dir, cut):
    """A safetensors file missing its last bytes is refused by name before anything is written.

    Guards against: the truncation check forgetting the header length (a file cut by fewer bytes than its JSON
    header is long would pass, and the last tensor would be read past the end of the file).
    """
    source = _save(model, tmp_path / "hf", tokenizer_dir)
    weights = source / "model.safetensors"
    data = weights.read_bytes()
    assert cut < int.from_bytes(data[:8], "little")  # fewer bytes than the header
    weights.write_bytes(data[:-cut])
    with pytest.raises(
        Llama2MLXError,
        match=r"model\.safetensors: .*(reaches past the end of the file|outside the file's \d+ data bytes)",
    ):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
