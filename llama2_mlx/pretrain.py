"""Pretraining from random initialisation: `PretrainConfig` and `run_pretrain`, on the shared training loop.

The corpus (a .txt with one document a line, or a .jsonl of {"text"}) is tokenized as BOS + document + EOS,
concatenated, and cut into rows of `seq_len` tokens (the paper's concatenation; no attention mask between
documents), every token trained. The optimiser and schedule are the paper's (LLAMA2_RECIPE.md). `out` becomes an
ordinary model folder (config.json, model.safetensors, tokenizer.model) rewritten at every checkpoint, beside
metrics.jsonl and checkpoint/ for `resume`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from llama2_mlx.config_fields import SEED_RANGE, validate_fields
from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import jsonl_records, utf8_lines

PAPER_WARMUP = 2000


@dataclass
class PretrainConfig:
    """Every field is a flag of `llama2-mlx pretrain` and a key of its -c config.yaml."""

    config: str = field(
        metadata={
            "help": "The architecture: a size preset (tiny, llama-2-7b, ...), a params.json or a config.json "
            "(not the YAML of flag values: that is -c/--config-file)."
        }
    )
    data: str = field(metadata={"help": 'Corpus: .txt with one document a line, or .jsonl with {"text"}.'})
    tokenizer: str = field(metadata={"help": "tokenizer.model, or a folder holding it."})
    out: str = field(metadata={"help": "Output model folder (plus metrics.jsonl and checkpoint/)."})
    valid: str | None = field(
        default=None, metadata={"help": "Validation corpus (default: --valid-fraction)."}
    )
    valid_fraction: float = field(
        default=0.01, metadata={"min": 0, "max": 0.99, "help": "Fraction of rows held out without --valid."}
    )
    lr: float = field(
        default=3e-4, metadata={"above": 0, "help": "Peak learning rate (paper: 3e-4 for 7B/13B)."}
    )
    warmup: int | None = field(
        default=None,
        metadata={"min": 0, "help": "Warmup steps (default: the paper's 2000, or 10% of --iters if fewer)."},
    )
    weight_decay: float = field(default=0.1, metadata={"min": 0, "help": "AdamW weight decay."})
    clip_norm: float = field(
        default=1.0, metadata={"min": 0, "help": "Clip gradients to this global norm (0: off)."}
    )
    batch_size: int = field(
        default=32, metadata={"min": 1, "help": "Rows per optimizer step, all processes together."}
    )
    seq_len: int = field(
        default=4096, metadata={"min": 2, "help": "Tokens per row (and the model's context)."}
    )
    iters: int | None = field(
        default=None, metadata={"min": 1, "help": "Optimizer steps (default: from --epochs)."}
    )
    epochs: float = field(
        default=1.0, metadata={"above": 0, "help": "Passes over the corpus when --iters is not set."}
    )
    grad_accum: int = field(default=1, metadata={"min": 1, "help": "Micro-batches per optimizer step."})
    grad_checkpoint: bool = field(default=False, metadata={"help": "Recompute activations to save memory."})
    loss_chunk: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "Positions per chunk of vocabulary logits in the loss (0: automatic, 128 at vocab 32000).",
        },
    )
    init_std: float = field(
        default=0.02, metadata={"above": 0, "help": "Std of the normal initialisation of weights."}
    )
    seed: int = field(
        default=0, metadata={**SEED_RANGE, "help": "Seed for initialisation, shuffling and the valid split."}
    )
    save_every: int = field(
        default=500, metadata={"min": 0, "help": "Checkpoint (and model folder) every N steps."}
    )
    eval_every: int = field(
        default=200, metadata={"min": 0, "help": "Validation loss every N steps (and at the end)."}
    )
    val_batches: int = field(
        default=0, metadata={"min": 0, "help": "Validation batches per evaluation (0: all of them)."}
    )
    report_every: int = field(default=10, metadata={"min": 1, "help": "Training loss report every N steps."})
    resume: bool = field(default=False, metadata={"help": "Continue from the checkpoint in --out."})
    force: bool = field(
        default=False, metadata={"help": "Start over in a non-empty --out (its contents are deleted)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show the progress bar."})

    def __post_init__(self) -> None:
        validate_fields(self)


# Fields whose change makes a checkpoint mean something else: --resume refuses them (run_folder.claim_run_folder).
PRETRAIN_MEANING_FIELDS = ("config", "data", "valid", "tokenizer", "data_fingerprint", "valid_fraction", "lr",
                           "warmup", "weight_decay", "clip_norm", "batch_size", "seq_len", "grad_accum", "init_std",
                           "seed")  # fmt: skip


def model_args_for(spec: str, vocab_size: int):
    """A preset name, Meta params.json or HF config.json -> ModelArgs with the tokenizer's vocabulary size."""
    from llama2_mlx.config import PRESETS, ModelArgs, preset

    path = Path(spec)
    if spec in PRESETS or not path.exists():
        return replace(preset(spec), vocab_size=vocab_size)
    try:
        params = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise Llama2MLXError(f"{path}: cannot read the model config ({error})") from None
    if "hidden_size" in params:
        return replace(ModelArgs.from_hf_config(params, source=str(path)), vocab_size=vocab_size)
    return ModelArgs.from_meta_params({**params, "vocab_size": -1}, vocab_size=vocab_size, source=str(path))


def read_documents(path: Path) -> list[str]:
    """One document per line of a .txt, or the "text" of each line of a .jsonl (errors name file:line)."""
    if path.suffix == ".jsonl":
        documents = [_document(where, row) for where, row in jsonl_records(path, "no such corpus file")]
    else:
        if not path.is_file():
            raise Llama2MLXError(f"{path}: no such corpus file")
        documents = []
        for number, line in utf8_lines(path):
            if line is None:
                raise Llama2MLXError(f"{path}:{number}: not UTF-8 text")
            if line.strip():
                documents.append(line.rstrip("\n"))
    if not documents:
        raise Llama2MLXError(f"{path}: the corpus is empty")
    return documents


def _document(where: str, row) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise Llama2MLXError(f'{where}: expected an object with a string "text"')
    return row["text"]


def chunk_corpus(documents: list[str], tokenizer, seq_len: int):
    """BOS + doc + EOS for every document, concatenated, cut into rows of `seq_len` tokens (the tail is dropped
    unless it is the only row). Every token is a target except each row's first, which has no context."""
    from llama2_mlx.data import Example

    stream: list[int] = []
    for document in documents:
        stream += tokenizer.encode(document, bos=True, eos=True)
    count = max(1, len(stream) // seq_len)
    rows = [stream[i * seq_len : (i + 1) * seq_len] for i in range(count)]
    return [Example(row, [False] + [True] * (len(row) - 1)) for row in rows]


def init_weights(model, std: float) -> None:
    """Normal(0, std) for every matrix (Hugging Face's LlamaConfig.initializer_range); norms stay 1."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    weights = [
        (k, mx.random.normal(v.shape) * std if v.ndim == 2 else v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(weights))


def run_pretrain(config: PretrainConfig, announce: Callable[[str], None] | None = None):
    """Train a new model from random weights on a text corpus; returns the TrainResult.

    `announce` receives one line describing the model, the data and the run before training starts.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from llama2_mlx.data import Batcher
    from llama2_mlx.fileio import write_model_files
    from llama2_mlx.losses import next_token_loss
    from llama2_mlx.model import Llama
    from llama2_mlx.optim import OptimizerConfig, make_optimizer
    from llama2_mlx.run_folder import claim_run_folder, continues_checkpoint, fingerprint
    from llama2_mlx.tokenizer import Tokenizer
    from llama2_mlx.trainer import Callback, TrainConfig, train

    world = mx.distributed.init()
    mx.random.seed(config.seed)
    tokenizer_path = Path(config.tokenizer)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.model"
    tokenizer = Tokenizer(tokenizer_path)
    args = replace(model_args_for(config.config, tokenizer.vocab_size), max_seq_len=config.seq_len)
    model = Llama(args)
    init_weights(model, config.init_std)
    mx.eval(model.parameters())

    rows = chunk_corpus(read_documents(Path(config.data)), tokenizer, config.seq_len)
    if config.valid:
        valid_rows = chunk_corpus(read_documents(Path(config.valid)), tokenizer, config.seq_len)
    else:
        order = list(range(len(rows)))
        random.Random(config.seed).shuffle(order)
        held = set(order[: int(round(len(rows) * config.valid_fraction))])
        valid_rows = [rows[i] for i in sorted(held)]
        rows = [row for i, row in enumerate(rows) if i not in held]
    if config.batch_size % config.grad_accum:
        raise Llama2MLXError(
            f"batch_size {config.batch_size} is not divisible by grad_accum {config.grad_accum}"
        )
    micro_batch = config.batch_size // config.grad_accum
    batching = dict(seq_len=config.seq_len, seed=config.seed, rank=world.rank(), world_size=world.size())
    batches = Batcher(rows, micro_batch, **batching)
    val_batches = (
        partial(Batcher(valid_rows, micro_batch, **batching).once, config.val_batches) if valid_rows else None
    )

    train_config = TrainConfig.from_job(config, len(batches))
    warmup = config.warmup if config.warmup is not None else min(PAPER_WARMUP, train_config.iters // 10)
    optimizer = make_optimizer(OptimizerConfig.from_job(config, warmup=warmup), train_config.iters)
    out = Path(config.out)
    tokenizer_dir = tokenizer_path.parent

    recorded = {**asdict(config), "data_fingerprint": fingerprint(config.data, config.valid, tokenizer_path)}
    claim = (
        claim_run_folder(
            out,
            "pretrain",
            recorded,
            config.resume,
            config.force,
            PRETRAIN_MEANING_FIELDS,
            inputs=[config.data, config.valid, tokenizer_path, Path(config.config)],
        )  # fmt: skip
        if world.rank() == 0
        else nullcontext()
    )
    with claim as run:  # every check above has passed: from here on the folder is ours
        if announce is not None and world.rank() == 0:
            n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
            announce(f"model: {n_params / 1e6:.1f}M parameters; corpus: {len(rows)} rows of {config.seq_len} tokens, "
                     f"{len(valid_rows)} for validation; {train_config.iters} steps")  # fmt: skip

        class SaveModel(Callback):
            def on_checkpoint(self, step: int, folder: Path) -> None:
                write_model_files(model, out, tokenizer_dir=tokenizer_dir)

        callbacks = [run.callback] if run is not None else []
        train_config.resume = continues_checkpoint(out, config.resume)
        return train(
            model,
            optimizer,
            partial(next_token_loss, chunk=config.loss_chunk or None),
            batches,
            train_config,
            val_batches,
            [*callbacks, SaveModel()],
        )
