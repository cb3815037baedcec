"""The one training loop: SFT, pretraining, the reward model and rejection sampling all plug into `train`.

A job brings three things: a loss function `loss_fn(model, *batch.inputs) -> (loss_sum, weight)`, a batch source
`batches(start) -> iterator of Batch` that can restart at any micro-batch index (that index is the resumable data
position), and a `TrainConfig`. The loss is returned as a SUM with its weight (e.g. the number of trained tokens)
so that the step's loss is sum / weight over the whole accumulated and all-reduced batch: packing, gradient
accumulation and the number of ranks change nothing but float rounding.

The loop compiles its step with `mx.compile`, accumulates gradients, averages them across `mx.distributed`
ranks, clips them to a global norm, reports to callbacks (progress bar, metrics.jsonl), evaluates, and writes
atomic checkpoints (trainable weights, optimizer state, step, RNG, data position) that `resume` continues exactly.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from llama2_mlx.errors import Llama2MLXError
from llama2_mlx.fileio import write_text_atomic

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


@dataclass
class Batch:
    """What a batch source yields: the loss function's arguments and how many real (non-pad) tokens they hold."""

    inputs: tuple[mx.array, ...]
    tokens: int


LossFn = Callable[..., tuple[mx.array, mx.array]]
BatchSource = Callable[[int], Iterator[Batch]]


@dataclass
class TrainConfig:
    iters: int
    grad_accum: int = 1
    grad_checkpoint: bool = False
    clip_norm: float | None = 1.0
    report_every: int = 10
    eval_every: int | None = 200  # None or 0: evaluate only before the first and after the last step
    save_every: int | None = 100  # None or 0: checkpoint only at the end
    out_dir: Path | None = None  # None: no checkpoints and no metrics.jsonl
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.iters <= 0:
            raise Llama2MLXError(f"iters must be positive, got {self.iters}")
        if self.grad_accum <= 0:
            raise Llama2MLXError(f"grad_accum must be positive, got {self.grad_accum}")
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)

    @classmethod
    def from_job(cls, job: Any, batches_per_epoch: int) -> TrainConfig:
        """Take the same-named fields of a job's config (SFTConfig, ...); `iters` defaults to its `epochs`."""
        values = {f.name: getattr(job, f.name) for f in fields(cls) if hasattr(job, f.name)}
        if not values.get("iters"):
            values["iters"] = max(1, math.ceil(job.epochs * batches_per_epoch / values.get("grad_accum", 1)))
        values["out_dir"] = Path(job.out)
        return cls(**values)


class Callback:
    """Hooks the loop calls on rank 0; override what you need."""

    def on_report(self, record: dict[str, Any]) -> None:
        """A training report (step, loss, lr, tokens/s, ...) or an evaluation (step, val_loss)."""

    def on_checkpoint(self, step: int, folder: Path) -> None:
        """A checkpoint for `step` was just written to `folder`."""


@dataclass
class TrainResult:
    step: int
    status: str  # "finished" | "interrupted"
    train_loss: float | None = None
    val_loss: float | None = None
    checkpoint: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    loss_fn: LossFn,
    batches: BatchSource,
    config: TrainConfig,
    val_batches: Callable[[], Iterable[Batch]] | None = None,
    callbacks: Iterable[Callback] = (),
) -> TrainResult:
    """Train `model`'s trainable parameters for `config.iters` optimizer steps; see the module docstring."""
    world = mx.distributed.init()
    is_main = world.rank() == 0
    callbacks = list(callbacks) if is_main else []
    if is_main and config.progress:
        callbacks.append(ProgressBar(config.iters))
    checkpoint_dir = config.out_dir / CHECKPOINT_DIR if config.out_dir is not None else None

    optimizer.init(model.trainable_parameters())
    start_step = 0
    if checkpoint_dir is not None and config.resume:
        start_step = load_checkpoint(model, optimizer, checkpoint_dir)
    elif checkpoint_dir is not None and checkpoint_dir.exists():
        raise Llama2MLXError(
            f"{checkpoint_dir}: a checkpoint exists; use --resume to continue it, or a new --out"
        )
    if config.out_dir is not None and is_main:
        metrics = MetricsFile(config.out_dir / METRICS_FILE, keep_until=start_step if config.resume else 0)
        callbacks.insert(0, metrics)
    result = TrainResult(step=start_step, status="finished", checkpoint=None)

    def report(record: dict[str, Any]) -> None:
        result.history.append(record)
        for callback in callbacks:
            callback.on_report(record)

    def save(step: int) -> None:
        if checkpoint_dir is None:
            return
        if is_main:
            save_checkpoint(model, optimizer, checkpoint_dir, step, step * config.grad_accum, world.size())
            for callback in callbacks:
                callback.on_checkpoint(step, checkpoint_dir)
        result.checkpoint = checkpoint_dir

    step_fn, accumulate_fn, apply_fn = _compile_steps(model, optimizer, loss_fn, config.clip_norm, world)
    evaluate_fn = _compile_eval(model, loss_fn)
    data = batches(start_step * config.grad_accum)
    window = _Window()
    model.train()
    with (
        gradient_checkpointing(model.layers if config.grad_checkpoint else []),
        _deferred_interrupt() as stop,
    ):
        if val_batches is not None and start_step == 0:
            result.val_loss = _validate(evaluate_fn, model, val_batches, world, 0, report)
        step = start_step
        while step < config.iters:
            tic = time.perf_counter()
            tokens = 0
            if config.grad_accum == 1:
                batch = next(data, None)
                if batch is None:
                    break
                loss, weight = step_fn(batch.inputs)
                tokens += batch.tokens
            else:
                accumulated = None
                for _ in range(config.grad_accum):
                    batch = next(data, None)
                    if batch is None:
                        break
                    accumulated = accumulate_fn(batch.inputs, accumulated)
                    tokens += batch.tokens
                    mx.eval(accumulated)
                if batch is None:
                    break
                loss, weight = apply_fn(accumulated)
            mx.eval(loss, weight, model.state, optimizer.state)
            step += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                kept = (
                    f"the last good checkpoint is in {checkpoint_dir}"
                    if result.checkpoint
                    else "no checkpoint was written"
                )
                raise Llama2MLXError(
                    f"training stopped: the loss became {loss_value} at step {step}; {kept} (try a lower --lr)"
                )
            window.add(loss_value, tokens, time.perf_counter() - tic)
            result.step, result.train_loss = step, loss_value
            if step % config.report_every == 0 or step == config.iters:
                report(window.record(step, optimizer, world))
            if val_batches is not None and (
                step == config.iters or (config.eval_every and step % config.eval_every == 0)
            ):
                result.val_loss = _validate(evaluate_fn, model, val_batches, world, step, report)
            if step == config.iters or (config.save_every and step % config.save_every == 0):
                save(step)
            if stop():
                if window.steps:
                    report(window.record(step, optimizer, world))
                save(step)
                result.status = "interrupted"
                break
    if result.step < config.iters and result.status == "finished":
        save(result.step)  # the data ran out before `iters`: keep what was trained
    return result


def _compile_steps(
    model: nn.Module, optimizer: optim.Optimizer, loss_fn: LossFn, clip_norm: float | None, world
):
    """Compiled (1) whole step, (2) accumulate one micro-batch, (3) apply accumulated gradients.

    Gradients of the loss SUM are added up, all-reduced, then divided by the total weight: the mean over every
    trained token of the global batch, whatever the split into micro-batches and ranks.
    """
    state = [model.state, optimizer.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, loss_fn)
    size = world.size()

    def apply(grads, total, weight):
        if size > 1:
            # average_gradients divides by the size; multiply back to get the sum over ranks
            grads = tree_map(lambda g: g * size, average_gradients(grads))
            total, weight = mx.distributed.all_sum(total), mx.distributed.all_sum(weight)
        grads = tree_map(lambda g: g / weight, grads)
        if clip_norm:
            grads, _ = optim.clip_grad_norm(grads, clip_norm)
        optimizer.update(model, grads)
        return total / weight, weight

    def forward(inputs):
        (total, weight), grads = value_and_grad(model, *inputs)
        return grads, total.astype(mx.float32), weight.astype(mx.float32)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs):
        return apply(*forward(inputs))

    @partial(mx.compile, inputs=state, outputs=state)
    def accumulate(inputs, accumulated):
        grads, total, weight = forward(inputs)
        if accumulated is None:
            return grads, total, weight
        old_grads, old_total, old_weight = accumulated
        return tree_map(mx.add, grads, old_grads), total + old_total, weight + old_weight

    @partial(mx.compile, inputs=state, outputs=state)
    def apply_accumulated(accumulated):
        return apply(*accumulated)

    return step, accumulate, apply_accumulated


def _compile_eval(model: nn.Module, loss_fn: LossFn):
    @partial(mx.compile, inputs=[model.state])
    def evaluate(inputs):
        total, weight = loss_fn(model, *inputs)
        return total.astype(mx.float32), weight.astype(mx.float32)

    return evaluate


def _validate(evaluate_fn, model, val_batches, world, step: int, report) -> float:
    """Mean validation loss over every batch (sum / weight, all-reduced over ranks)."""
    model.eval()
    total, weight = mx.array(0.0), mx.array(0.0)
    for batch in val_batches():
        batch_total, batch_weight = evaluate_fn(batch.inputs)
        total, weight = total + batch_total, weight + batch_weight
        mx.eval(total, weight)
    model.train()
    if world.size() > 1:
        total, weight = mx.distributed.all_sum(total), mx.distributed.all_sum(weight)
    if weight.item() == 0:
        raise Llama2MLXError("the validation set has no tokens to score")
    val_loss = (total / weight).item()
    report({"step": step, "val_loss": val_loss})
    return val_loss


class _Window:
    """Training statistics since the last report."""

    def __init__(self) -> None:
        self.trained_tokens = 0
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.seconds = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.seconds += seconds

    def record(self, step: int, optimizer: optim.Optimizer, world) -> dict[str, Any]:
        tokens = self.tokens
        if world.size() > 1:
            tokens = int(mx.distributed.all_sum(mx.array(tokens)).item())
        self.trained_tokens += tokens
        record = {
            "step": step,
            "loss": sum(self.losses) / len(self.losses),
            "lr": optimizer.learning_rate.item(),
            "tokens_per_sec": tokens / self.seconds if self.seconds else 0.0,
            "trained_tokens": self.trained_tokens,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
        self.reset()
        return record


class ProgressBar(Callback):
    """One line on stderr, rewritten in place: step, loss, learning rate, tokens/s and peak memory."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.last = ""

    def on_report(self, record: dict[str, Any]) -> None:
        if "val_loss" in record:  # a line of its own, below the current progress line
            self.stream.write(
                ("\n" if self.last else "")
                + f"step {record['step']}/{self.total}  val_loss {record['val_loss']:.4f}\n"
            )
            self.last = ""
        else:
            done = int(20 * record["step"] / self.total)
            line = (
                f"[{'#' * done}{'.' * (20 - done)}] step {record['step']}/{self.total}  loss {record['loss']:.4f}"
                f"  lr {record['lr']:.2e}  {record['tokens_per_sec']:.0f} tok/s  peak {record['peak_memory_gb']:.2f} GB"
            )
            if self.stream.isatty():
                self.stream.write("\r" + line.ljust(len(self.last)))
                self.last = line
            else:  # a pipe or log file gets whole lines, not carriage returns
                self.stream.write(line + "\n")
        self.stream.flush()

    def on_checkpoint(self, step: int, folder: Path) -> None:
        if step == self.total and self.last:
            self.stream.write("\n")
            self.last = ""


class MetricsFile(Callback):
    """metrics.jsonl: one JSON object per report. On resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in _read_lines(path) if keep_until and json.loads(line)["step"] <= keep_until]
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def on_report(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def save_checkpoint(
    model: nn.Module, optimizer: optim.Optimizer, folder: Path, step: int, position: int, world_size: int
) -> None:
    """Trainable weights, optimizer state, step, RNG key and data position, replaced atomically as one folder."""
    from llama2_mlx.model_folder import atomic_folder

    key = mx.random.state[0].tolist()
    with atomic_folder(folder, force=True) as tmp:
        mx.save_safetensors(
            str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters()))
        )
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        state = {"step": step, "data_position": position, "rng_key": key, "world_size": world_size}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def load_checkpoint(model: nn.Module, optimizer: optim.Optimizer, folder: Path) -> int:
    """Restore what `save_checkpoint` wrote; returns the step to continue from."""
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        raise Llama2MLXError(f"{folder}: no checkpoint to resume from (trainer_state.json missing)")
    state = json.loads(state_file.read_text())
    world_size = mx.distributed.init().size()
    if state.get("world_size", 1) != world_size:
        raise Llama2MLXError(
            f"{state_file}: saved with {state['world_size']} process(es), resuming with {world_size}; "
            "the data position would not match"
        )
    weights = mx.load(str(folder / "trainable.safetensors"))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected):
        raise Llama2MLXError(
            f"{folder}: the checkpoint's trainable tensors do not match this model and settings"
        )
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    high, low = state["rng_key"]
    mx.random.seed((high << 32) | low)
    mx.eval(model.parameters(), optimizer.state)
    return state["step"]


@contextmanager
def gradient_checkpointing(layers: list[nn.Module]):
    """Recompute each layer's activations in the backward pass instead of storing them (less memory, ~30% slower).

    Swaps the class of these layer INSTANCES only (not every instance of the type, as a patch of `__call__` would).
    """
    originals = [layer.__class__ for layer in layers]
    for layer in layers:
        layer.__class__ = _checkpointed_class(layer.__class__)
    try:
        yield
    finally:
        for layer, cls in zip(layers, originals, strict=True):
            layer.__class__ = cls


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED:
        call = cls.__call__

        def checkpointed_call(self, *args, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": checkpointed_call})
    return _CHECKPOINTED[cls]


@contextmanager
def _deferred_interrupt():
    """Turn Ctrl-C into a flag the loop checks between steps, so the checkpoint it saves is a consistent one."""
    requested = []
    previous = None

    def handler(signum, frame):
        if requested:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        requested.append(True)
        print(
            "\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        previous = None
    try:
        yield lambda: bool(requested)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
