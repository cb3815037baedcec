"""The reward model: the Llama 2 network with its next-token head replaced by one scalar (LLAMA2_RECIPE.md).

`RewardModel` is the `Transformer` backbone plus `score`, a `Linear(dim, 1)` (Hugging Face's
`LlamaForSequenceClassification` names), read at the last real token of each row. It never computes vocabulary
logits. The network sees exactly what `sft` trains on: the prompt in the Llama 2 chat format, then the answer and
EOS (`encode_response`).

A reward-model folder is either standalone (config.json saying `LlamaForSequenceClassification`, `num_labels: 1`,
weights with `score.weight`, tokenizer), or small: the same config.json plus `"base_model"` (a chat model folder,
relative to this folder), a LoRA adapter of the backbone (the `sft` adapter format) and `score.safetensors`.
`load_reward_model` reads both into a `RewardScorer`: `rm(prompt, answer) -> float`, `rm.score_batch(...)`.
Reward models on one base share the base's weights in memory (`BaseCache`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from llama2_mlx.config import ModelArgs
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.model import Mask, Transformer, TransformerBlock
from llama2_mlx.tokenizer import Message, Tokenizer, as_dialog

ARCHITECTURE = "LlamaForSequenceClassification"
HEAD_FILE = "score.safetensors"
# transformers' sequence classifier finds each row's last real token through a pad id; Llama 2 has none, so the
# export names <unk> (id 0), which byte-fallback tokenizers never emit for text.
PAD_TOKEN_ID = 0

Prompt = str | Sequence[Message]


class RewardModel(nn.Module):
    """`rm(tokens, last)` -> float32 rewards [batch], one scalar per row read at position `last[row]`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Transformer(args)
        # The head starts at zero: every answer scores 0 until training says otherwise, so the first loss is
        # exactly log 2 (plus the margin term) and no random preference of an untrained head leaks into the
        # first LoRA updates. It is the only new weight; the backbone starts as the chat model it comes from.
        self.score = nn.Linear(args.dim, 1, bias=False)
        self.score.weight = mx.zeros((1, args.dim))

    def __call__(self, tokens: mx.array, last: mx.array | None = None, mask: Mask = None) -> mx.array:
        h = self.model(tokens, mask)  # [batch, length, dim]
        h = h[:, -1] if last is None else h[mx.arange(h.shape[0]), last]  # [batch, dim]
        return self.score(h)[:, 0].astype(mx.float32)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers


def encode_response(tokenizer: Tokenizer, prompt: Prompt, answer: str) -> list[int]:
    """The tokens the reward model reads: `prompt` (a string, or a dialog ending with a user turn) in the Llama 2
    chat format, then `answer` and EOS: exactly the ids `sft` trains on for that dialog."""
    messages = as_dialog(prompt)
    if not isinstance(answer, str):
        raise Llama2MLXError(f"the answer must be a string, got {type(answer).__name__}")
    ids, _ = tokenizer.encode_dialog_with_mask([*messages, {"role": "assistant", "content": answer}])
    return ids


def pad_rows(rows: Sequence[Sequence[int]], side: str = "right") -> tuple[mx.array, mx.array, Mask]:
    """(tokens, last, mask) for `RewardModel` from rows of different lengths, padded on `side`.

    Right padding needs no mask: causal attention never looks at the pads after a row's last token.
    Left padding hides each row's pads with `generation.left_padding_mask`.
    """
    from llama2_mlx.generation import left_padding_mask

    width = max(len(row) for row in rows)
    pads = [width - len(row) for row in rows]
    if side == "right":
        tokens = [list(row) + [PAD_TOKEN_ID] * pad for row, pad in zip(rows, pads, strict=True)]
        return mx.array(tokens), mx.array([len(row) - 1 for row in rows]), None
    if side != "left":
        raise Llama2MLXError(f"padding side must be 'left' or 'right', got {side!r}")
    tokens = [[PAD_TOKEN_ID] * pad + list(row) for row, pad in zip(rows, pads, strict=True)]
    mask = left_padding_mask(mx.array(pads), 0, width)
    return mx.array(tokens), mx.array([width - 1] * len(rows)), mask


def score_rows(
    network: RewardModel,
    rows: Sequence[Sequence[int]],
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[float]:
    """Rewards of token rows, in batches of similar lengths (right-padded); `on_batch(n)` after each batch."""
    if batch_size < 1:
        raise Llama2MLXError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    rewards = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        tokens, last, mask = pad_rows([rows[i] for i in chosen])
        for index, reward in zip(chosen, network(tokens, last, mask).tolist(), strict=True):
            rewards[index] = reward
        if on_batch is not None:
            on_batch(len(chosen))
    return rewards


@dataclass
class RewardScorer:
    """A loaded reward model with its tokenizer: `rm(prompt, answer) -> float`, `rm.score_batch(...)`."""

    network: RewardModel
    tokenizer: Tokenizer
    path: Path
    base_path: Path | None = None  # the chat model folder a LoRA reward model is an adapter of

    def __call__(self, prompt: Prompt, answer: str) -> float:
        return self.score_batch([prompt], [answer])[0]

    @property
    def tokenizer_dir(self) -> Path | None:
        """The folder holding the tokenizer files (the reward model's own, else its base's)."""
        return _tokenizer_dir(self.path, self.base_path)

    def encode(self, prompt: Prompt, answer: str) -> list[int]:
        ids = encode_response(self.tokenizer, prompt, answer)
        if len(ids) > self.network.args.max_seq_len:
            raise Llama2MLXError(
                f"prompt and answer are {len(ids)} tokens, more than the reward model's context "
                f"({self.network.args.max_seq_len})"
            )
        return ids

    def score_batch(
        self,
        prompts: Sequence[Prompt],
        answers: Sequence[str],
        batch_size: int = 16,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[float]:
        """Rewards of many (prompt, answer) pairs, batched with padding; equal to scoring them one at a time."""
        if len(prompts) != len(answers):
            raise Llama2MLXError(f"{len(prompts)} prompts but {len(answers)} answers")
        rows = [self.encode(prompt, answer) for prompt, answer in zip(prompts, answers, strict=True)]
        return self.score_batch_ids(rows, batch_size, on_batch)

    def score_batch_ids(
        self,
        rows: Sequence[Sequence[int]],
        batch_size: int = 16,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[float]:
        """Rewards of rows already encoded by `encode` (e.g. sampled answers appended to their prompts)."""
        self.network.eval()
        return score_rows(self.network, rows, batch_size, on_batch)


def reward_config(args: ModelArgs, base_model: str | None = None) -> dict:
    """config.json keys that make a model folder a reward-model folder (added to the Llama config)."""
    extra = {"architectures": [ARCHITECTURE], "num_labels": 1, "pad_token_id": PAD_TOKEN_ID}
    if base_model is not None:
        extra["base_model"] = base_model
    return extra


def is_reward_folder(folder: Path) -> bool:
    from llama2_mlx.model_folder import read_config

    return ARCHITECTURE in (read_config(folder).get("architectures") or [])


def build_reward_model(args: ModelArgs, quantization: dict | None = None) -> RewardModel:
    """A reward model of this shape; a quantized base quantizes the backbone only (the head stays float)."""
    network = RewardModel(args)
    if quantization:
        nn.quantize(network.model, group_size=quantization["group_size"], bits=quantization["bits"])
    return network


@dataclass
class BaseCache:
    """Chat-model weights already in memory, by folder: reward models (and a policy) on one base share them."""

    weights: dict[Path, dict[str, mx.array]] = field(default_factory=dict)

    def add(self, folder: str | os.PathLike, network: nn.Module) -> None:
        """Offer the frozen base weights of a loaded `Llama` or `RewardModel` (LoRA layers see through)."""
        self.weights[Path(folder).resolve()] = base_parameters(network)

    def get(self, folder: Path) -> dict[str, mx.array] | None:
        return self.weights.get(folder.resolve())


def base_parameters(network: nn.Module) -> dict[str, mx.array]:
    """The backbone's weights by their base-model names (`model.*`), LoRA matrices left out and LoRA-wrapped
    layers named as the plain layers they wrap."""
    from llama2_mlx.lora import LoRALinear

    wrapped = {name for name, module in network.named_modules() if isinstance(module, LoRALinear)}
    weights = {}
    for name, array in tree_flatten(network.parameters()):
        if not name.startswith("model.") or name.endswith((".lora_a", ".lora_b")):
            continue
        stem, _, leaf = name.rpartition(".")
        if stem.endswith(".linear") and stem[: -len(".linear")] in wrapped:
            name = f"{stem[: -len('.linear')]}.{leaf}"
        weights[name] = array
    return weights


def reward_model_from_chat(
    folder: str | os.PathLike, dtype: mx.Dtype | None = None, bases: BaseCache | None = None
) -> RewardModel:
    """A new reward model initialised from a chat model folder: its backbone, and a zero head."""
    from llama2_mlx.model_folder import fill_model, read_config, read_quantization, read_weights

    folder = Path(folder)
    config = read_config(folder)
    if ARCHITECTURE in (config.get("architectures") or []):
        raise Llama2MLXError(f"{folder}: is a reward model; start a reward model from a chat model folder")
    network = build_reward_model(
        ModelArgs.from_hf_config(config, source=str(folder / "config.json")),
        read_quantization(config, str(folder / "config.json")),
    )
    shared = bases.get(folder) if bases is not None else None
    weights = dict(shared) if shared is not None else _backbone_weights(read_weights(folder))
    weights["score.weight"] = network.score.weight
    fill_model(network, weights, str(folder), dtype)
    if bases is not None and shared is None:
        bases.add(folder, network)
    return network


def _backbone_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """A chat model's weights without its next-token head."""
    return {name: array for name, array in weights.items() if not name.startswith("lm_head.")}


def load_reward_model(
    path: str | os.PathLike, dtype: mx.Dtype | None = None, bases: BaseCache | None = None
) -> RewardScorer:
    """Load a reward-model folder (standalone, or base + adapter + head) with its tokenizer.

    With `bases`, a LoRA reward model whose base is already there reuses those weights instead of loading a copy.
    """
    from llama2_mlx.lora import apply_adapter
    from llama2_mlx.model_folder import fill_model, read_config, read_quantization, read_weights

    folder = Path(path)
    config = read_config(folder)
    if ARCHITECTURE not in (config.get("architectures") or []):
        raise Llama2MLXError(
            f"{folder / 'config.json'}: not a reward model (architectures is not [{ARCHITECTURE!r}]); "
            "train one with `llama2-mlx train-rm`"
        )
    base_path = None
    if config.get("base_model"):
        base_path = resolve_base(folder, config["base_model"])
        network = reward_model_from_chat(base_path, dtype, bases)
        apply_adapter(network, folder)
        head = folder / HEAD_FILE
        if not head.is_file():
            raise Llama2MLXError(f"{head}: missing; the reward model holds no trained head yet")
        weights = mx.load(str(head))
        if set(weights) != {"score.weight"} or weights["score.weight"].shape != network.score.weight.shape:
            raise Llama2MLXError(
                f"{head}: expected one tensor score.weight of shape {network.score.weight.shape}"
            )
        network.load_weights(list(weights.items()), strict=False)
        mx.eval(network.parameters())
    else:
        args = ModelArgs.from_hf_config(config, source=str(folder / "config.json"))
        network = build_reward_model(args, read_quantization(config, str(folder / "config.json")))
        fill_model(network, read_weights(folder), str(folder), dtype)
    tokenizer_dir = _tokenizer_dir(folder, base_path)
    if tokenizer_dir is None:
        raise Llama2MLXError(f"{folder}: missing tokenizer.model")
    return RewardScorer(network, Tokenizer(tokenizer_dir / "tokenizer.model"), folder, base_path)


def _tokenizer_dir(folder: Path, base_path: Path | None) -> Path | None:
    """The folder whose tokenizer a reward model uses: its own, else its base's (None if neither has one)."""
    for candidate in (folder, base_path):
        if candidate is not None and (candidate / "tokenizer.model").is_file():
            return candidate
    return None


def load_reward_models(*paths: str | os.PathLike, dtype: mx.Dtype | None = None) -> list[RewardScorer]:
    """Several reward models (e.g. helpfulness and safety); those on one base hold its weights once."""
    bases = BaseCache()
    return [load_reward_model(path, dtype, bases) for path in paths]


def fused_reward_model(path: str | os.PathLike, dequantize: bool = False) -> RewardScorer:
    """A LoRA reward model loaded with its adapter merged into the backbone (`lora.fuse`); the head is kept."""
    from llama2_mlx.lora import fuse
    from llama2_mlx.model_folder import read_config

    if is_reward_folder(Path(path)) and not read_config(Path(path)).get("base_model"):
        raise Llama2MLXError(
            f"{Path(path) / 'config.json'}: a standalone reward model (no base_model): there is no adapter to fuse"
        )
    scorer = load_reward_model(path)
    fuse(scorer.network, dequantize=dequantize)
    return scorer


def fuse_reward_model(
    path: str | os.PathLike, out: str | os.PathLike, dequantize: bool = False, force: bool = False
) -> Path:
    """A LoRA reward-model folder -> a standalone one at `out` (backbone with the adapter merged, head, tokenizer),
    which needs its base no more."""
    from llama2_mlx.model_folder import save_model

    scorer = fused_reward_model(path, dequantize)
    return save_model(scorer.network, out, tokenizer_dir=scorer.tokenizer_dir, force=force,
                      config_extra=reward_config(scorer.network.args))  # fmt: skip


def resolve_base(folder: Path, base_model: str) -> Path:
    """The base model folder named in a reward model's config: relative to that folder, else as given; the
    shipped demo reward model's base is the shipped demo model wherever an install puts the two."""
    from llama2_mlx.loading import demo_model_path, demo_reward_model_path

    candidates = [folder / base_model, Path(base_model)]
    if folder.resolve() == demo_reward_model_path().resolve():
        candidates.append(demo_model_path())
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise Llama2MLXError(f"{folder / 'config.json'}: base_model {base_model!r} is not a model folder")


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """True when both tokenizers give every piece the same id (so token ids can pass between their models)."""
    return a.vocab_size == b.vocab_size and all(
        a.id_to_piece(i) == b.id_to_piece(i) for i in range(a.vocab_size)
    )
