"""Direct preference optimisation (`llama2-mlx dpo`): the preference pairs of `train-rm`, trained into the policy.

Loss per pair, with h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)) over the
answer tokens: "sigmoid" -log(sigmoid(beta * h - m)) (Rafailov et al.; m is an optional rating margin as in the
reward model, off by default), or "ipo" (h - 1/(2 beta))^2 on per-token mean log-probabilities (Azar et al., as TRL).
`--nll-coef` adds that weight times the chosen answer's mean negative log-likelihood per token (Llama 3 trained DPO
with 0.2 of it; TRL's rpo_alpha): DPO alone can lower the chosen answer's likelihood along with the rejected one's,
and the SFT term holds the policy to the chosen answers while it learns the preference.

The reference is the starting policy (the base, or base + --adapter), and it is fixed: its log-probabilities are
computed once, before training, by the very network that is then trained. So no second model is ever held, not
even with --full (which elsewhere needs a frozen copy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from llama2_mlx.finetune import FineTuneConfig
from llama2_mlx.preferences import Pair, PairBatcher
from llama2_mlx.trainer import Batch

LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(FineTuneConfig):
    """Every field is a flag of `llama2-mlx dpo` and a key of its -c config.yaml."""

    data: str = field(
        metadata={"help": "Preference pairs (as train-rm): a .jsonl file, or a folder with train.jsonl (and valid.jsonl)."}
    )  # fmt: skip
    out: str = field(metadata={"help": "Output folder (adapter or model, metrics.jsonl, checkpoint/)."})
    beta: float = field(
        default=0.1, metadata={"above": 0, "help": "Strength of the pull towards the reference (DPO's beta)."}
    )
    loss: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo.", "choices": list(LOSSES)})
    nll_coef: float = field(
        default=0.0,
        metadata={
            "min": 0,
            "help": "Add this weight times the chosen answer's per-token NLL (Llama 3: 0.2; TRL: rpo_alpha).",
        },
    )
    margin: str = field(
        default="off",
        metadata={"help": "Subtract a margin from beta * h: the rows' ratings by the reward model's scale (small, "
                          "large; a row's numeric margin wins), or off.", "choices": ["off", "small", "large"]},
    )  # fmt: skip
    adapter: str | None = field(
        default=None, metadata={"help": "The starting policy's LoRA adapter (e.g. from sft): the reference, and "
                                        "the adapter training continues."}
    )  # fmt: skip
    lr: float = field(
        default=1e-5, metadata={"help": "Peak learning rate (TRL's DPO default is 1e-6 for full)."}
    )
    epochs: float = field(default=1.0, metadata={"help": "Passes over the pairs when --iters is not set."})
    batch_size: int = field(
        default=32, metadata={"help": "Pairs per optimizer step, all processes together."}
    )
    eval_every: int = field(default=50, metadata={"help": "Validation every N steps (and at the end)."})


def answer_logprobs(model, tokens, answer_mask):
    """(sum of log p(token | prefix) over each row's answer tokens, number of answer tokens), both [rows].

    `answer_mask` is aligned with `tokens` and marks the answer tokens (targets), as SFT's loss mask does. With a
    frozen output projection (LoRA) the vocabulary logits exist one chunk of positions at a time
    (`losses.token_logprobs`); a trainable one (`--full`) needs them whole for its gradient.
    """
    import mlx.core as mx

    from llama2_mlx.losses import head_is_trainable, token_logprobs

    if head_is_trainable(model):
        logits = model(tokens[:, :-1])
        picked = mx.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
        logp = picked - mx.logsumexp(logits, axis=-1)
    else:
        logp = token_logprobs(model, tokens)
    mask = answer_mask[:, 1:].astype(mx.float32)
    return (logp * mask).sum(-1), mask.sum(-1)


def dpo_loss(
    model,
    tokens,
    margin,
    answer_mask,
    reference,
    beta: float = 0.1,
    loss: str = "sigmoid",
    nll_coef: float = 0.0,
):
    """The trainer's (sum, weight) contract: summed per-pair losses and the number of pairs."""
    import mlx.core as mx
    import mlx.nn as nn

    n = margin.shape[0]
    sums, counts = answer_logprobs(model, tokens, answer_mask)
    h = _log_ratio_gap(sums, counts, reference, loss)
    if loss == "ipo":
        losses = mx.square(h - 1 / (2 * beta))
    else:
        losses = -nn.log_sigmoid(beta * h - margin)
    if nll_coef:
        losses = losses - nll_coef * sums[:n] / counts[:n]
    return losses.sum(), mx.array(n, dtype=mx.float32)


def _log_ratio_gap(sums, counts, reference, loss: str):
    """h per pair: the policy-over-reference log-ratio of chosen minus that of rejected (IPO: per-token means), from
    the rows' summed answer log-probabilities and answer lengths (chosen rows first)."""
    ratio = sums - reference
    if loss == "ipo":
        ratio = ratio / counts
    n = ratio.shape[0] // 2
    return ratio[:n] - ratio[n:]


class DPOBatcher(PairBatcher):
    """Pair batches with each row's answer mask and its reference log-probability: (tokens, margins, answer_mask,
    reference). `reference[i]` is (chosen, rejected) of pair i; None gives zeros (to compute the reference)."""

    def __init__(self, pairs: list[Pair], batch_size: int, reference: list[tuple[float, float]] | None = None,
                 **kwargs: Any):  # fmt: skip
        off = kwargs.get("margin") == "off"
        super().__init__(
            pairs, batch_size, **{**kwargs, "margin": "none" if off else kwargs.get("margin", "none")}
        )
        if off:
            self.margins = [0.0] * len(pairs)
        self.reference = reference or [(0.0, 0.0)] * len(pairs)

    def make_batch(self, indices: list[int]) -> Batch:
        import mlx.core as mx
        import numpy as np

        batch = super().make_batch(indices)
        tokens, last, margins = batch.inputs
        mine = indices[self.rank :: self.world_size]
        mask = np.zeros(tokens.shape, bool)
        ends = last.tolist()
        for row, index in enumerate(mine + mine):
            mask[row, self.pairs[index].prompt_len : ends[row] + 1] = True
        reference = [self.reference[i][0] for i in mine] + [self.reference[i][1] for i in mine]
        return Batch((tokens, margins, mx.array(mask), mx.array(reference, dtype=mx.float32)), batch.tokens)


def reference_logprobs(model, pairs: list[Pair], batch_size: int) -> list[tuple[float, float]]:
    """log ref(answer | prompt) of both answers of every pair, from `model` as it is now (eval mode)."""
    model.eval()
    batcher = DPOBatcher(pairs, batch_size)
    reference = [(0.0, 0.0)] * len(pairs)
    for indices in batcher.batches:
        tokens, _, mask, _ = batcher.make_batch(indices).inputs
        sums = answer_logprobs(model, tokens, mask)[0].tolist()
        for row, index in enumerate(indices):
            reference[index] = (sums[row], sums[len(indices) + row])
    return reference


def preference_metrics(model, batcher: DPOBatcher, beta: float, loss: str) -> dict[str, Any]:
    """DPO's implicit reward on held-out pairs: accuracy (chosen above rejected) and the mean margin."""
    gaps = []
    for batch in batcher.once():
        tokens, _, mask, reference = batch.inputs
        gaps += (beta * _log_ratio_gap(*answer_logprobs(model, tokens, mask), reference, loss)).tolist()
    return {"val_accuracy": sum(g > 0 for g in gaps) / len(gaps), "val_reward_margin": sum(gaps) / len(gaps)}


def run_dpo(config: DPOConfig, announce: Callable[[str], None] | None = None):
    """DPO of `config.model` (+ `config.adapter`) on `config.data`; returns (TrainResult, DataReport, the last
    validation metrics or None). Everything is checked before anything is written."""
    import mlx.core as mx

    from llama2_mlx.fileio import write_model_files
    from llama2_mlx.finetune import AdapterWriter, claim_job_folder, make_trainable, meaning_fields
    from llama2_mlx.loading import demo_model_path, load
    from llama2_mlx.optim import OptimizerConfig, make_optimizer
    from llama2_mlx.preferences import load_pairs
    from llama2_mlx.run_folder import continues_checkpoint
    from llama2_mlx.trainer import TrainConfig, train

    world = mx.distributed.init()
    model_path = Path(config.model) if config.model else demo_model_path()
    out = Path(config.out)
    mx.random.seed(config.seed)
    model, tokenizer = load(model_path)
    train_pairs, valid_pairs, report = load_pairs(
        config.data,
        tokenizer,
        config.seq_len,
        config.valid_fraction,
        config.seed,
        config.skip_bad_lines,
        require_rating=False,
    )
    lora = make_trainable(model, config, model_path, config.adapter)
    if announce is not None and world.rank() == 0:
        announce(
            f"reference log-probabilities of {len(train_pairs) + len(valid_pairs)} pairs (the starting policy)"
        )
    reference = reference_logprobs(model, train_pairs, config.micro_batch)
    batching = dict(margin=config.margin, seed=config.seed, rank=world.rank(), world_size=world.size())
    batches = DPOBatcher(train_pairs, config.micro_batch, reference, **batching)
    val_batches = val_metrics = None
    if valid_pairs:
        valid = DPOBatcher(valid_pairs, config.micro_batch, reference_logprobs(model, valid_pairs, config.micro_batch),
                           **batching)  # fmt: skip
        val_batches = valid.once

        def val_metrics(network) -> dict[str, Any]:
            return preference_metrics(network, valid, config.beta, config.loss)

    train_config = TrainConfig.from_job(config, len(batches))
    optimizer = make_optimizer(OptimizerConfig.from_job(config), train_config.iters)
    with claim_job_folder(config, "dpo", model_path, meaning_fields(config), world.rank() == 0) as run:
        if announce is not None and world.rank() == 0:
            announce(
                f"data: {report.summary()}; {len(train_pairs)} pairs for training, {len(valid_pairs)} for "
                f"validation; {len(batches)} batches per epoch, {train_config.iters} steps; {config.loss} loss, "
                f"beta {config.beta}"
            )
        train_config.resume = continues_checkpoint(out, config.resume)
        callbacks = [run.callback] if run is not None else []
        callbacks += [AdapterWriter(model, out, lora, model_path)] if lora is not None else []
        loss = partial(dpo_loss, beta=config.beta, loss=config.loss, nll_coef=config.nll_coef)
        result = train(model, optimizer, loss, batches, train_config, val_batches, callbacks, val_metrics)
        if config.full and world.rank() == 0:
            write_model_files(model, out, tokenizer_dir=model_path)
    metrics = next((r for r in reversed(result.history) if "val_accuracy" in r), None)
    return result, report, metrics
