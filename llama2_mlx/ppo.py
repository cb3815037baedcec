"""PPO as in the paper (LLAMA2_RECIPE.md, "PPO"), on ONE frozen base model (`llama2-mlx ppo`).

Everything shares the base's weights: the policy is a LoRA adapter on it; the reference pi_0 is the same network
with the starting adapter (none: every LoRA layer switched off, `lora.adapters_disabled`); the reward model is its
own adapter + head on the same base (`reward_model.BaseCache`); the value function is a scalar head on the
policy's last hidden state (`ActorCritic`). `--full` trains every weight and so needs a frozen copy as reference.

Each rollout samples one answer per prompt with the current policy (the batched generation loop), scores it
(`rewards.reward_source`: RM, the paper's safety rule, or a function), and turns it into per-token rewards
R = WHITEN(LOGIT(Rc)) at the last token minus kl_coef * (log pi - log pi_0) at every token (our reward models
output the logit already). GAE gives advantages; the loss is the clipped objective plus a clipped value loss,
optimised in minibatches by the shared training loop, which sees a rollout as `ppo_epochs` x minibatches steps.
With `--ptx-data`, each step also adds the next-token loss of a minibatch of SFT examples (InstructGPT's PPO-ptx),
which holds the policy to what SFT taught while it chases the reward model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.finetune import FineTuneConfig
from llama2_mlx.rewards import RewardFlags
from llama2_mlx.trainer import Batch

VALUE_HEAD_FILE = "value_head.safetensors"
ROLLOUT_FILE = "rollout.safetensors"  # the current rollout, so a resume inside it continues exactly
FULL_LR, LORA_LR = 1e-6, 1e-5
# FineTuneConfig flags with no meaning for PPO (no validation set, no epochs over data): not offered.
UNUSED_FLAGS = ("epochs", "valid_fraction", "val_batches", "eval_every", "seq_len")


@dataclass
class PPOConfig(FineTuneConfig, RewardFlags):
    """Every field is a flag of `llama2-mlx ppo` and a key of its -c config.yaml (defaults: the paper's)."""

    data: str = field(
        metadata={"flag": "prompts", "help": 'Prompts: .jsonl of {"prompt"} or {"messages"}, optionally "safety": true.'}
    )  # fmt: skip
    out: str = field(
        metadata={"help": "Output folder: the policy adapter, value head, metrics.jsonl, checkpoint/."}
    )
    adapter: str | None = field(
        default=None, metadata={"help": "The SFT adapter to start from: the reference policy, and the adapter PPO "
                                        "continues."}
    )  # fmt: skip
    iters: int | None = field(default=200, metadata={"help": "PPO iterations (rollouts; paper: 200-400)."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per rollout (paper: 512)."})
    minibatch_size: int = field(
        default=16, metadata={"min": 1, "help": "Rollout rows per optimizer step (paper: 64)."}
    )
    ppo_epochs: int = field(default=1, metadata={"min": 1, "help": "Passes over each rollout."})
    lr: float | None = field(
        default=None, metadata={"help": f"Constant learning rate (default: the paper's {FULL_LR:g} with --full, "
                                        f"{LORA_LR:g} for LoRA, whose update starts from zero)."}
    )  # fmt: skip
    kl_coef: float = field(
        default=0.01, metadata={"min": 0, "help": "beta of the KL penalty (paper: 0.01 for 7B/13B)."}
    )
    clip: float = field(
        default=0.2, metadata={"min": 0, "help": "PPO clipping of the probability ratio (paper: 0.2)."}
    )
    value_clip: float = field(default=0.2, metadata={"min": 0, "help": "Clipping of the value update."})
    vf_coef: float = field(default=0.1, metadata={"min": 0, "help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"min": 0, "help": "Discount of GAE."})
    lam: float = field(default=0.95, metadata={"min": 0, "help": "lambda of GAE."})
    temperature: float = field(
        default=1.0,
        metadata={"above": 0, "help": "Sampling temperature of the rollouts (PPO needs samples)."},
    )
    top_p: float = field(
        default=1.0,
        metadata={"above": 0, "max": 1, "help": "Nucleus sampling mass of the rollouts (1.0: off)."},
    )
    max_tokens: int = field(default=64, metadata={"min": 1, "help": "Longest sampled answer."})
    report_every: int = field(default=1, metadata={"help": "Report (and write metrics.jsonl) every N steps."})
    warmup: int = field(default=0, metadata={"help": "Warmup steps (the paper's PPO LR is constant)."})
    ptx_data: str | None = field(
        default=None,
        metadata={"help": "SFT-format .jsonl whose next-token loss joins every step (InstructGPT's PPO-ptx), so "
                          "PPO does not unlearn what SFT taught."},
    )  # fmt: skip
    ptx_coef: float = field(
        default=1.0,
        metadata={
            "min": 0,
            "help": "Weight of the --ptx-data loss per token, beside the PPO loss per token.",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_rewards()
        if self.batch_size % self.minibatch_size:
            raise Llama2MLXError(
                f"batch_size {self.batch_size} is not divisible by minibatch_size {self.minibatch_size}"
            )

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * (self.batch_size // self.minibatch_size)


class ActorCritic(nn.Module):
    """The policy and its value head: `model(tokens)` -> (log p(tokens[:, t + 1] | tokens[:, :t + 1]), the value
    at t), both float32 [B, L - 1], from one pass of the policy's hidden states. With a frozen output projection
    (LoRA) the vocabulary logits exist one chunk of positions at a time (`losses.hidden_logprobs`); a trainable
    one (`--full`) needs them whole for its gradient."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        # Zero: the first value estimates are 0 and the critic learns from the returns, not from noise.
        self.value_head = nn.Linear(policy.args.dim, 1, bias=False)
        self.value_head.weight = mx.zeros((1, policy.args.dim))

    def __call__(self, tokens: mx.array, differentiable: bool = True) -> tuple[mx.array, mx.array]:
        from llama2_mlx.losses import head_is_trainable, hidden_logprobs

        h = self.policy.model(tokens[:, :-1])
        values = self.value_head(h)[..., 0].astype(mx.float32)
        if head_is_trainable(self.policy):
            return token_logprobs(self.policy.head(h), tokens[:, 1:]), values
        return hidden_logprobs(self.policy, h, tokens[:, 1:], differentiable=differentiable), values

    @property
    def layers(self):
        return self.policy.layers


def token_logprobs(logits: mx.array, targets: mx.array) -> mx.array:
    """log p(target) per position from whole logits: logits [B, L, V], targets [B, L] -> [B, L]."""
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)


def whiten(values: np.ndarray, shift_mean: bool = True) -> np.ndarray:
    """(x - mean) / std over all entries (the paper's WHITEN); constant input gives zeros."""
    mean, std = values.mean(), values.std()
    return ((values - mean) if shift_mean else values) / (std + 1e-8)


def logit(probability: np.ndarray) -> np.ndarray:
    """The paper's LOGIT, inverse of the sigmoid: reward models that output probabilities map back to logits."""
    p = np.clip(probability, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def gae(rewards: np.ndarray, values: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Advantages and returns of one answer's tokens: delta_t = r_t + gamma V_{t+1} - V_t (V after the last
    token is 0), A_t = delta_t + gamma lam A_{t+1}, return_t = A_t + V_t."""
    advantages = np.zeros_like(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


def ppo_loss(model, tokens, mask, old_logp, advantages, returns, old_values, reward, kl, *ptx,
             clip: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1, ptx_coef: float = 1.0):  # fmt: skip
    """The clipped objective plus vf_coef * the clipped value loss, summed over answer tokens (weight: their count).

    Inputs are aligned with targets (position j holds what concerns tokens[:, j + 1]). `ptx`, when given, is an SFT
    batch (`data.Batcher`'s inputs): ptx_coef times its mean next-token loss is added per answer token. Also
    returns the metrics the progress bar and metrics.jsonl show: mean reward and KL per answer, value loss and clip
    fraction per token (and the SFT loss per token)."""
    logp, values = model(tokens)
    mask = mask.astype(mx.float32)
    ratio = mx.exp(logp - old_logp)
    policy_loss = -mx.minimum(ratio * advantages, mx.clip(ratio, 1 - clip, 1 + clip) * advantages)
    clipped_values = old_values + mx.clip(values - old_values, -value_clip, value_clip)
    value_loss = 0.5 * mx.maximum(mx.square(values - returns), mx.square(clipped_values - returns))
    tokens_count = mask.sum()
    rows = mx.array(reward.shape[0], dtype=mx.float32)
    metrics = {
        "reward": (reward.sum(), rows),
        "kl": (kl.sum(), rows),
        "value_loss": ((value_loss * mask).sum(), tokens_count),
        "clip_fraction": (((mx.abs(ratio - 1) > clip) * mask).sum(), tokens_count),
    }
    total = ((policy_loss + vf_coef * value_loss) * mask).sum()
    if ptx:
        from llama2_mlx.losses import next_token_loss

        ptx_total, ptx_tokens = next_token_loss(model.policy, *ptx)
        total = total + ptx_coef * tokens_count * ptx_total / ptx_tokens
        metrics["ptx_loss"] = (ptx_total, ptx_tokens)
    return total, tokens_count, metrics


@contextmanager
def reference_policy(policy: nn.Module, starting_adapter: dict[str, mx.array] | None):
    """The policy network as pi_0: the starting adapter's weights swapped in (restored afterwards), or with every
    LoRA layer off when PPO started from the bare base."""
    from llama2_mlx.lora import adapters_disabled, lora_parameters

    if starting_adapter is None:
        with adapters_disabled(policy):
            yield policy
        return
    current = lora_parameters(policy)
    policy.load_weights(list(starting_adapter.items()), strict=False)
    try:
        yield policy
    finally:
        policy.load_weights(list(current.items()), strict=False)


class RolloutSource:
    """The trainer's batch source for PPO: minibatches of rollouts, each rollout sampled by the current policy when
    the previous one is used up. Step s belongs to rollout s // steps_per_rollout; the rollout in use is saved to
    `out/rollout.safetensors`, so a run resumed inside it continues with the same data. With `ptx` (a stream of
    SFT batches) step s also carries the stream's batch s."""

    def __init__(self, network: ActorCritic, tokenizer, prompts, rewards, config: PPOConfig, reference: Callable,
                 out: Path | None = None, say: Callable[[str], None] = print,
                 ptx: Callable[[int], Iterator[Batch]] | None = None):  # fmt: skip
        self.network, self.tokenizer, self.prompts, self.rewards = network, tokenizer, prompts, rewards
        self.config, self.reference, self.out, self.say, self.ptx = config, reference, out, say, ptx

    def __call__(self, start: int = 0) -> Iterator[Batch]:
        rollout, offset = divmod(start, self.config.steps_per_rollout)
        ptx = self.ptx(start) if self.ptx is not None else None
        while True:
            buffer = self._saved(rollout) if offset else self.collect(rollout)
            for step, rows in enumerate(self._minibatches(rollout, buffer["tokens"].shape[0])):
                if step >= offset:
                    batch = self._batch(buffer, rows)
                    yield batch if ptx is None else Batch(batch.inputs + next(ptx).inputs, batch.tokens)
            rollout, offset = rollout + 1, 0

    def _minibatches(self, rollout: int, n_rows: int) -> list[np.ndarray]:
        size = self.config.minibatch_size
        batches = []
        for epoch in range(self.config.ppo_epochs):
            order = np.random.default_rng([self.config.seed, rollout, epoch]).permutation(n_rows)
            batches += [order[i : i + size] for i in range(0, n_rows, size)]
        return batches

    def _batch(self, buffer: dict[str, np.ndarray], rows: np.ndarray) -> Batch:
        names = ("tokens", "mask", "old_logp", "advantages", "returns", "old_values", "reward", "kl")
        inputs = tuple(mx.array(buffer[name][rows]) for name in names)
        return Batch(inputs, int(buffer["mask"][rows].sum()))

    def _saved(self, rollout: int) -> dict[str, np.ndarray]:
        path = self.out / ROLLOUT_FILE if self.out is not None else None
        if path is None or not path.is_file():
            raise Llama2MLXError(
                f"{self.out}: the checkpoint is inside rollout {rollout + 1} but {ROLLOUT_FILE} is missing"
            )
        saved = {name: np.array(array) for name, array in mx.load(str(path)).items()}
        if int(saved.pop("rollout")) != rollout:
            raise Llama2MLXError(f"{path}: holds another rollout than the checkpoint's")
        return saved

    def prompt_indices(self, rollout: int) -> list[int]:
        from llama2_mlx.data import epoch_order

        order = epoch_order(len(self.prompts), self.config.seed, rollout * self.config.batch_size)
        return [next(order) for _ in range(self.config.batch_size)]

    def collect(self, rollout: int) -> dict[str, np.ndarray]:
        """Sample, score and evaluate one rollout: everything the minibatches of the loss need."""
        from llama2_mlx.generation import generate_batch_ids

        config, network = self.config, self.network
        network.eval()
        prompts = [self.prompts[i] for i in self.prompt_indices(rollout)]
        answers, _ = generate_batch_ids(
            network.policy, self.tokenizer, [p.messages for p in prompts], max_tokens=config.max_tokens,
            temperature=config.temperature, top_p=config.top_p, seed=config.seed * 1_000_003 + rollout,
        )  # fmt: skip
        answers = [a[0] for a in answers]
        texts = [self.tokenizer.decode(a).strip() for a in answers]
        answers = [
            a + [self.tokenizer.eos_id] * (len(a) < config.max_tokens) for a in answers
        ]  # EOS if finished
        scores = np.array(self.rewards(prompts, texts, answers), dtype=np.float32)
        rows = [(self.tokenizer.encode_dialog(p.messages), a) for p, a in zip(prompts, answers, strict=True)]
        buffer = self._evaluate(rows, scores)
        network.train()
        if self.out is not None:
            from llama2_mlx.fileio import save_safetensors_atomic

            arrays = {name: mx.array(value) for name, value in buffer.items()}
            save_safetensors_atomic(self.out / ROLLOUT_FILE, {**arrays, "rollout": mx.array(rollout)})
        return buffer

    def _evaluate(
        self, rows: Sequence[tuple[list[int], list[int]]], scores: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Old log-probs and values of the policy, the reference's log-probs, per-token rewards, GAE."""
        config = self.config
        width = max(len(p) + len(a) for p, a in rows)
        tokens = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width - 1), bool)  # aligned with targets
        for r, (prompt, answer) in enumerate(rows):
            tokens[r, : len(prompt) + len(answer)] = prompt + answer
            mask[r, len(prompt) - 1 : len(prompt) + len(answer) - 1] = True
        old_logp, values = self.network(mx.array(tokens), differentiable=False)
        with self.reference() as reference:
            ref_logp = reference(mx.array(tokens))
        mx.eval(old_logp, values, ref_logp)
        old_logp, values, ref_logp = (np.array(a) for a in (old_logp, values, ref_logp))
        kl = (old_logp - ref_logp) * mask
        final = whiten(logit(1 / (1 + np.exp(-scores))))  # = whiten(scores): our RMs output logits
        advantages = np.zeros_like(old_logp)
        returns = np.zeros_like(old_logp)
        for r in range(len(rows)):
            positions = np.flatnonzero(mask[r])
            token_rewards = -config.kl_coef * kl[r, positions]
            token_rewards[-1] += final[r]
            advantages[r, positions], returns[r, positions] = gae(token_rewards, values[r, positions],
                                                                  config.gamma, config.lam)  # fmt: skip
        advantages[mask] = whiten(advantages[mask])
        return {"tokens": tokens, "mask": mask, "old_logp": old_logp * mask, "advantages": advantages * mask,
                "returns": returns, "old_values": values * mask, "reward": scores,
                "kl": kl.sum(axis=1).astype(np.float32)}  # fmt: skip


def run_ppo(config: PPOConfig, announce: Callable[[str], None] | None = None):
    """PPO of `config.model` (+ `config.adapter`) on `config.data`; returns the trainer's result.

    Everything (flags, models, tokenizers, prompts, the reward function) is checked before anything is written."""
    from llama2_mlx.fileio import save_safetensors_atomic, write_model_files
    from llama2_mlx.finetune import AdapterWriter, claim_job_folder, make_trainable, meaning_fields
    from llama2_mlx.loading import demo_model_path, load
    from llama2_mlx.lora import lora_parameters
    from llama2_mlx.model_folder import load_model
    from llama2_mlx.optim import OptimizerConfig, make_optimizer
    from llama2_mlx.prompts import read_prompts
    from llama2_mlx.rewards import reward_source
    from llama2_mlx.run_folder import continues_checkpoint
    from llama2_mlx.trainer import Callback, TrainConfig, train

    say = announce or (lambda line: None)
    world = mx.distributed.init()
    if world.size() > 1:
        raise Llama2MLXError("ppo runs in one process (its rollouts are not split across processes yet)")
    model_path = Path(config.model) if config.model else demo_model_path()
    out = Path(config.out)
    mx.random.seed(config.seed)
    policy, tokenizer = load(model_path)
    prompts = read_prompts(Path(config.data), tokenizer, policy.args.max_seq_len, config.max_tokens,
                           config.skip_bad_lines)  # fmt: skip
    ptx = _ptx_batches(config, tokenizer, policy.args.max_seq_len) if config.ptx_data else None
    rewards = reward_source(config, model_path, policy, tokenizer, prompts, say)
    lora = make_trainable(policy, config, model_path, config.adapter)
    if lora is None:
        say("--full: the reference policy is a second, frozen copy of the model in memory")
        frozen = load_model(model_path)
        reference = partial(_frozen_reference, frozen)
    else:
        starting = dict(lora_parameters(policy)) if config.adapter is not None else None
        reference = partial(reference_policy, policy, starting)
    network = ActorCritic(policy)
    train_config = TrainConfig(
        iters=config.iters * config.steps_per_rollout, grad_accum=1, grad_checkpoint=config.grad_checkpoint,
        clip_norm=config.clip_norm, report_every=config.report_every, eval_every=None,
        save_every=config.save_every, out_dir=out, resume=config.resume, progress=config.progress,
    )  # fmt: skip
    lr = config.lr if config.lr is not None else (FULL_LR if config.full else LORA_LR)
    # the paper's PPO learning rate is constant: no decay (min_lr_fraction 1)
    optimizer = make_optimizer(
        OptimizerConfig.from_job(config, lr=lr, min_lr_fraction=1.0), train_config.iters
    )
    source = RolloutSource(
        network, tokenizer, prompts, rewards, config, _reference_call(reference), out, say, ptx
    )

    class SaveValueHead(Callback):
        def on_checkpoint(self, step: int, folder: Path) -> None:
            save_safetensors_atomic(out / VALUE_HEAD_FILE, {"weight": network.value_head.weight})

    with claim_job_folder(config, "ppo", model_path, meaning_fields(config, {"score_batch"})) as run:
        say(f"prompts: {len(prompts)}; {config.iters} rollouts of {config.batch_size} prompts, "
            f"{config.steps_per_rollout} optimizer steps each ({train_config.iters} steps)"
            + (f"; SFT loss of {len(ptx.examples)} examples from {config.ptx_data} (ptx)" if ptx else ""))  # fmt: skip
        train_config.resume = continues_checkpoint(out, config.resume)
        callbacks = [run.callback, SaveValueHead()]
        callbacks += [AdapterWriter(policy, out, lora, model_path)] if lora is not None else []
        loss = partial(ppo_loss, clip=config.clip, value_clip=config.value_clip, vf_coef=config.vf_coef,
                       ptx_coef=config.ptx_coef)  # fmt: skip
        result = train(network, optimizer, loss, source, train_config, None, callbacks)
        if config.full:
            write_model_files(policy, out, tokenizer_dir=model_path)
    return result


def _ptx_batches(config: PPOConfig, tokenizer, seq_len: int):
    """The SFT batches of --ptx-data, `minibatch_size` examples each, masked and shuffled as sft does."""
    from llama2_mlx.data import Batcher, DataReport, EncodeOptions, read_examples

    examples = read_examples(
        Path(config.ptx_data), tokenizer, EncodeOptions(), DataReport(), config.skip_bad_lines
    )
    return Batcher(examples, config.minibatch_size, seq_len, seed=config.seed)


@contextmanager
def _frozen_reference(frozen: nn.Module):
    yield frozen


def _reference_call(reference: Callable) -> Callable:
    """A context manager factory yielding a function tokens -> the reference policy's log-probs of each next token
    [B, L - 1], one chunk of vocabulary logits at a time."""
    from llama2_mlx.losses import token_logprobs as chunked_logprobs

    @contextmanager
    def enter():
        with reference() as model:
            yield lambda tokens: chunked_logprobs(model, tokens, differentiable=False)

    return enter


def summary(history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean reward of the first and the last quarter of the reported steps, and the last quarter's KL (for the CLI's
    closing line): each rollout has other prompts, so a single step's reward says little."""
    reports = [r for r in history if "reward" in r]
    if not reports:
        return {}
    quarter = max(1, len(reports) // 4)
    first, last = reports[:quarter], reports[-quarter:]
    return {
        "first_reward": sum(r["reward"] for r in first) / quarter,
        "last_reward": sum(r["reward"] for r in last) / quarter,
        "last_kl": sum(r["kl"] for r in last) / quarter,
    }
