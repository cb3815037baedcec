"""The MLX model against two independent PyTorch references: a port of Meta's model.py and transformers' Llama.

Tolerance (float32): max |ours - reference| <= 1e-4 * max(1, max |reference logit|).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from llama2_mlx.cache import KVCache
from llama2_mlx.config import ModelArgs, ffn_hidden_dim, preset
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model import Llama
from llama2_mlx.model_folder import load_model, save_model
from tests.conftest import random_model, tiny_args
from tests.reference import meta_model

META_TO_HF = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# (dim, n_heads, n_kv_heads, vocab, multiple_of): MHA at odd sizes, and GQA with 4 query heads per KV head
CONFIGS = {"mha-odd": (48, 4, 4, 301, 7), "gqa": (64, 8, 2, 256, 16)}


def assert_close(ours: mx.array, reference: np.ndarray) -> None:
    ours = np.array(ours)
    scale = max(1.0, float(np.abs(reference).max()))
    err = float(np.abs(ours - reference).max())
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} exceeds {1e-4 * scale:.3g}"


def meta_reference(name: str, n_layers: int = 2, seed: int = 0) -> meta_model.Transformer:
    dim, n_heads, n_kv_heads, vocab, multiple_of = CONFIGS[name]
    torch.manual_seed(seed)
    params = meta_model.ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                  vocab_size=vocab, multiple_of=multiple_of, norm_eps=1e-5, max_seq_len=64)  # fmt: skip
    reference = meta_model.Transformer(params).eval()
    with torch.no_grad():  # norms away from 1 so that their weights are exercised too
        for module in reference.modules():
            if isinstance(module, meta_model.RMSNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
    return reference


def meta_weights_for_mlx(reference: torch.nn.Module) -> list[tuple[str, mx.array]]:
    weights = []
    for key, tensor in reference.state_dict().items():
        name = key
        for meta, hf in META_TO_HF.items():
            if name.startswith(meta + ".") or f".{meta}." in name:
                name = name.replace(meta, hf, 1)
                break
        if name.startswith("layers."):
            name = "model." + name
        weights.append((name, mx.array(tensor.numpy())))
    return weights


def ours_from_meta(reference: meta_model.Transformer) -> Llama:
    """Meta's weights unpermuted, so RoPE must rotate adjacent pairs (traditional=True)."""
    p = reference.params
    args = ModelArgs(dim=p.dim, n_layers=p.n_layers, n_heads=p.n_heads, n_kv_heads=p.n_kv_heads,
                     vocab_size=p.vocab_size, hidden_dim=reference.layers[0].feed_forward.w1.out_features,
                     norm_eps=p.norm_eps, rope_traditional=True)  # fmt: skip
    model = Llama(args)
    model.load_weights(meta_weights_for_mlx(reference))
    return model


def tokens(batch: int, length: int, vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("length", [1, 7, 33])
def test_logits_match_meta_reference(name, length):
    reference = meta_reference(name)
    ours = ours_from_meta(reference)
    ids = tokens(2, length, reference.params.vocab_size)
    expected = reference(torch.tensor(ids)).numpy()
    assert_close(ours(mx.array(ids)), expected)


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_decoding_matches_meta_reference_and_full_forward(name):
    reference = meta_reference(name)
    ours = ours_from_meta(reference)
    ids = tokens(2, 12, reference.params.vocab_size, seed=3)
    full = np.array(ours(mx.array(ids)))
    cache = ours.make_cache()
    prefill = ours(mx.array(ids[:, :5]), cache=cache)  # a prompt, then one token at a time
    steps = [ours(mx.array(ids[:, i : i + 1]), cache=cache) for i in range(5, 12)]
    stepped = np.array(mx.concatenate([prefill, *steps], axis=1))
    assert_close(mx.array(stepped), full)
    # Meta's own cached decoding gives the same last-position logits
    reference(torch.tensor(ids[:, :5]), start_pos=0)
    for i in range(5, 12):
        expected = reference(torch.tensor(ids[:, i : i + 1]), start_pos=i).numpy()
        assert_close(mx.array(stepped[:, i : i + 1]), expected)


def hf_reference(n_heads: int, n_kv_heads: int, seed: int = 0, rope_theta: float = 10000.0, norm_eps: float = 1e-5,
                 tie: bool = False):  # fmt: skip
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=n_heads,
                         num_key_value_heads=n_kv_heads, vocab_size=301, rms_norm_eps=norm_eps, rope_theta=rope_theta,
                         max_position_embeddings=64, tie_word_embeddings=tie)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_logits_match_transformers_reference(heads):
    _assert_matches_transformers(hf_reference(*heads))


@pytest.mark.parametrize(
    "settings", [{"rope_theta": 1e6}, {"norm_eps": 1e-2}, {"tie": True, "rope_theta": 500.0}]
)
def test_config_values_off_their_defaults_reach_the_model(settings):
    """The other parity tests use rope_theta 10000, norm_eps 1e-5 and untied embeddings; here each is changed.

    Guards against: the model ignoring rope_theta from its config (hard-coded 10000), RMSNorm ignoring norm_eps,
    and from_hf_config dropping rope_theta, rms_norm_eps or tie_word_embeddings.
    """
    reference = hf_reference(8, 2, seed=2, **settings)
    with torch.no_grad():  # embeddings well above the default init, so that norm_eps 1e-2 is not everything
        reference.model.embed_tokens.weight.mul_(0.1 / reference.model.embed_tokens.weight.std())
    _assert_matches_transformers(reference)


def _assert_matches_transformers(reference) -> None:
    args = ModelArgs.from_hf_config(reference.config.to_dict())
    ours = Llama(args)
    tied = reference.config.tie_word_embeddings  # a tied checkpoint has no lm_head.weight of its own
    ours.load_weights([(k, mx.array(v.numpy())) for k, v in reference.state_dict().items()
                       if not (tied and k == "lm_head.weight")])  # fmt: skip
    ids = tokens(2, 33, 301, seed=5)
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    assert_close(ours(mx.array(ids)), expected)


def test_batched_cache_grows_in_steps_and_trims(monkeypatch):
    monkeypatch.setattr(KVCache, "step", 4)  # force several growths in a short sequence
    model = random_model(tiny_args())
    ids = mx.array(tokens(2, 11, 384, seed=7))
    full = model(ids)
    cache = model.make_cache()
    outs = [model(ids[:, i : i + 1], cache=cache) for i in range(11)]
    assert cache[0].keys.shape[2] == 12 and cache[0].offset == 11
    assert_close(mx.concatenate(outs, axis=1), np.array(full))
    # trim the last 3 positions and decode them again: same logits
    assert cache[0].trim(3) == 3
    for layer_cache in cache[1:]:
        layer_cache.trim(3)
    again = model(ids[:, 8:], cache=cache)
    assert_close(again, np.array(full[:, 8:]))
    for layer_cache in cache:
        layer_cache.reset()
    assert_close(model(ids[:, :4], cache=cache), np.array(full[:, :4]))


def test_custom_mask_equals_causal():
    model = random_model(tiny_args())
    ids = mx.array(tokens(1, 9, 384))
    causal = mx.tril(mx.ones((9, 9), dtype=mx.bool_))
    assert_close(model(ids, mask=causal), np.array(model(ids)))


def test_ffn_hidden_sizes_of_published_models():
    assert ffn_hidden_dim(4096, 256) == 11008
    assert ffn_hidden_dim(5120, 256) == 13824
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672
    assert preset("llama-2-70b").n_kv_heads == 8 and preset("llama-2-70b").hidden_dim == 28672
    assert preset("llama-2-7b").n_kv_heads == 32


def test_meta_params_resolution_and_errors():
    params = {"dim": 64, "n_layers": 2, "n_heads": 8, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
    args = ModelArgs.from_meta_params(params, vocab_size=301)
    assert (args.vocab_size, args.n_kv_heads, args.hidden_dim) == (301, 8, 192)
    with pytest.raises(Llama2MLXError, match="vocab_size"):
        ModelArgs.from_meta_params(params)
    with pytest.raises(Llama2MLXError, match="missing required field.*n_heads"):
        ModelArgs.from_meta_params({"dim": 64, "n_layers": 2, "norm_eps": 1e-5}, 301)
    with pytest.raises(Llama2MLXError, match="n_heads 8 is not divisible by n_kv_heads 3"):
        ModelArgs.from_meta_params({**params, "n_kv_heads": 3}, 301)
    with pytest.raises(Llama2MLXError, match="unknown model preset"):
        preset("llama-3")


def test_hf_config_round_trip_ignores_unknown_keys():
    args = tiny_args()
    config = {**args.to_hf_config(), "torch_dtype": "bfloat16", "some_future_key": 1}
    assert ModelArgs.from_hf_config(config) == args
    bad = {k: v for k, v in config.items() if k != "intermediate_size"}
    with pytest.raises(Llama2MLXError, match="config.json: missing required field.*intermediate_size"):
        ModelArgs.from_hf_config(bad)


def test_folder_round_trip_sharded(tmp_path, tokenizer_dir):
    model = random_model(tiny_args())
    save_model(model, tmp_path / "m", tokenizer_dir=tokenizer_dir, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_model(tmp_path / "m")
    ids = mx.array(tokens(2, 7, 384))
    assert mx.array_equal(loaded(ids), model(ids))


def test_mlx_lm_loads_our_folder_with_same_logits(tiny_model_dir):
    import mlx_lm

    theirs, _ = mlx_lm.load(str(tiny_model_dir))
    ours = load_model(tiny_model_dir)
    ids = mx.array(tokens(2, 17, 384, seed=11))
    assert_close(theirs(ids).astype(mx.float32), np.array(ours(ids)))


def test_dtype_follows_device_with_override(tiny_model_dir):
    assert load_model(tiny_model_dir).model.norm.weight.dtype == mx.float32  # CPU backend
    half = load_model(tiny_model_dir, dtype=mx.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    assert half(mx.array([[1, 5, 9]])).dtype == mx.float32


def test_bad_folders_name_the_problem(tmp_path, tiny_model_dir):
    with pytest.raises(Llama2MLXError, match="no such model folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Llama2MLXError, match="config.json: missing"):
        load_model(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    (broken / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    with pytest.raises(
        Llama2MLXError,
        match=r"model.layers.0.mlp.down_proj.weight has shape \(64, 160\), the config expects \(64, 128\)",
    ):
        load_model(broken)
