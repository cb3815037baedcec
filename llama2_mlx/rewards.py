"""Where rejection sampling and PPO get their rewards: a reward model, a helpfulness + safety pair combined by the
paper's rule, or a Python function `f(prompt: str, answer: str) -> float` for verifiable tasks.

`RewardFlags` are the flags both commands share; `reward_source` turns them into one scoring function, checked
before any sampling (it imports, returns floats, and the reward models share the policy's tokenizer).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.prompts import PromptRow


@dataclass(kw_only=True)
class RewardFlags:
    """The reward flags of `rejection-sample` and `ppo` (mixed into their configs)."""

    reward_model: str | None = field(
        default=None,
        metadata={"help": "Reward-model folder (train-rm) scoring helpfulness (default without --reward-fn: the "
                          "shipped demo reward model)."},
    )  # fmt: skip
    safety_reward_model: str | None = field(
        default=None, metadata={"help": "A safety reward model, combined with the paper's rule."}
    )
    safety_threshold: float = field(
        default=0.15,
        metadata={"help": "Use the safety score when sigmoid(safety score) is below this (paper: 0.15)."},
    )
    reward_fn: str | None = field(
        default=None, metadata={"help": "module:function, f(prompt: str, answer: str) -> float, instead of an RM."}
    )  # fmt: skip
    score_batch: int = field(default=32, metadata={"help": "Answers scored together by the reward model."})

    def check_rewards(self) -> None:
        if self.reward_model is not None and self.reward_fn is not None:
            raise Llama2MLXError("give one of --reward-model and --reward-fn, not both")
        if self.safety_reward_model is not None and self.reward_model is None:
            raise Llama2MLXError("--safety-reward-model combines with --reward-model, not --reward-fn")
        if not 0 <= self.safety_threshold <= 1:
            raise Llama2MLXError(f"safety_threshold must be in [0, 1], got {self.safety_threshold}")
        if self.score_batch < 1:
            raise Llama2MLXError(f"score_batch must be >= 1, got {self.score_batch}")


def combine_safety(helpful: float, safety: float, is_safety_prompt: bool, threshold: float = 0.15) -> float:
    """The paper's rule: the safety score for a safety prompt or when sigmoid(safety) < threshold (the paper's
    reward models output probabilities; ours output their logits), else the helpfulness score."""
    return safety if is_safety_prompt or 1 / (1 + math.exp(-safety)) < threshold else helpful


# (prompts, answer texts, answer token ids as sampled, EOS included when the answer finished) -> rewards
RewardFn = Callable[[Sequence[PromptRow], Sequence[str], Sequence[Sequence[int]]], list[float]]


def load_reward_fn(spec: str) -> Callable[[str, str], float]:
    """Import `module:function` from the current directory or PYTHONPATH."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise Llama2MLXError(f"--reward-fn {spec!r}: expected module:function")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise Llama2MLXError(f"--reward-fn {spec!r}: cannot import it ({error})") from None
    if not callable(function):
        raise Llama2MLXError(f"--reward-fn {spec!r}: is not a function")
    return function


def function_rewards(function: Callable[[str, str], float], spec: str) -> RewardFn:
    def score(
        prompts: Sequence[PromptRow], answers: Sequence[str], ids: Sequence[Sequence[int]]
    ) -> list[float]:
        rewards = []
        for prompt, answer in zip(prompts, answers, strict=True):
            value = function(prompt.text, answer)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise Llama2MLXError(f"--reward-fn {spec}: returned {value!r}, not a finite float")
            rewards.append(float(value))
        return rewards

    return score


def model_rewards(helpful, safety=None, threshold: float = 0.15, batch_size: int = 32) -> RewardFn:
    """Rewards from a reward model, or from a helpfulness + safety pair combined by `combine_safety`.

    The reward models read the sampled token ids after the prompt in the chat format (they share the policy's
    tokenizer), not a re-encoding of the decoded text, which can differ and outgrow the context."""

    def score(
        prompts: Sequence[PromptRow], answers: Sequence[str], ids: Sequence[Sequence[int]]
    ) -> list[float]:
        rows = [
            helpful.tokenizer.encode_dialog(p.messages) + list(a) for p, a in zip(prompts, ids, strict=True)
        ]
        scores = helpful.score_batch_ids(rows, batch_size)
        if safety is None:
            return scores
        safe = safety.score_batch_ids(rows, batch_size)
        return [
            combine_safety(h, s, p.safety, threshold) for h, s, p in zip(scores, safe, prompts, strict=True)
        ]

    return score


def reward_source(
    flags: RewardFlags, model_path: Path, policy, tokenizer, prompts: Sequence[PromptRow], say=print
) -> RewardFn:
    """The reward function of the run, checked now: it imports, returns floats, and shares the policy's tokenizer."""
    if flags.reward_fn is not None:
        score = function_rewards(load_reward_fn(flags.reward_fn), flags.reward_fn)
        score(prompts[:1], [""], [[]])  # fails now, before any sampling, if it does not return a float
        return score
    from llama2_mlx.reward_model import BaseCache, load_reward_model, same_tokenizer

    bases = BaseCache()
    bases.add(model_path, policy)  # an RM trained on the policy's base shares its weights
    from llama2_mlx.loading import demo_reward_model_path

    models = [load_reward_model(flags.reward_model or demo_reward_model_path(), bases=bases)]
    if flags.safety_reward_model is not None:
        models.append(load_reward_model(flags.safety_reward_model, bases=bases))
    for rm in models:
        if rm.base_path is None or rm.base_path.resolve() != Path(model_path).resolve():
            say(f"{rm.path}: its base is not the policy's, so it holds its own copy of the weights in memory")
        if not same_tokenizer(rm.tokenizer, tokenizer):
            raise Llama2MLXError(
                f"{rm.path}: the reward model's tokenizer differs from the policy's ({model_path})"
            )
    return model_rewards(models[0], models[1] if len(models) > 1 else None, flags.safety_threshold,
                         flags.score_batch)  # fmt: skip
