"""The one training loop: SFT, pretraining, the reward model and rejection sampling all plug into `train`.

A job brings three things: a loss function `loss_fn(model, *batch.inputs) -> (loss_sum, weight)` (optionally a third
output, a dict of named metrics as (sum, count) pairs that reports show as sum / count, e.g. PPO's clip fraction),
a batch source
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
        if self.report_every <= 0:
            raise Llama2MLXError(f"report_every must be positive, got {self.report_every}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            raise Llama2MLXError(f"clip_norm must be a finite number >= 0 (0: off), got {self.clip_norm}")
        for name in ("eval_every", "save_every"):
            if (getattr(self, name) or 0) < 0:
                raise Llama2MLXError(f"{name} must be >= 0, got {getattr(self, name)}")
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

    def on_start(self, step: int) -> None:
        """Training starts at `step` (0, or the step of the checkpoint just loaded for --resume); nothing has been
        written yet, so a run refused by the checks before this point leaves its folder untouched."""

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
    val_metrics: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> TrainResult:
    """Train `model`'s trainable parameters for `config.iters` optimizer steps; see the module docstring.

    `val_metrics(model)`, if given, adds job-specific numbers (e.g. a reward model's accuracy) to each validation
    record; it runs with the model in eval mode.
    """
    world = mx.distributed.init()
    is_main = world.rank() == 0
    callbacks = list(callbacks) if is_main else []
    if is_main and config.progress:
        callbacks.append(ProgressBar(config.iters))
    checkpoint_dir = config.out_dir / CHECKPOINT_DIR if config.out_dir is not None else None

    optimizer.init(model.trainable_parameters())
    start_step, window = 0, _Window()
    if checkpoint_dir is not None and config.resume:
        start_step = load_checkpoint(model, optimizer, checkpoint_dir, window=window)
    elif checkpoint_dir is not None and checkpoint_dir.exists():
        raise Llama2MLXError(
            f"{checkpoint_dir}: a checkpoint exists; use --resume to continue it, or a new --out"
        )
    for callback in callbacks:
        callback.on_start(start_step)
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
            save_checkpoint(model, optimizer, checkpoint_dir, step, step * config.grad_accum, world.size(),
                            window=window, kept=result.checkpoint)  # fmt: skip
            for callback in callbacks:
                callback.on_checkpoint(step, checkpoint_dir)
        result.checkpoint = checkpoint_dir

    accumulate_fn, reduce_fn, update_fn = _compile_steps(model, optimizer, loss_fn, config.clip_norm, world)
    evaluate_fn = _compile_eval(model, loss_fn)
    data = batches(start_step * config.grad_accum)
    model.train()
    with (
        gradient_checkpointing(model.layers if config.grad_checkpoint else []),
        _deferred_interrupt() as stop,
    ):
        if val_batches is not None and start_step == 0:
            result.val_loss = _validate(evaluate_fn, model, val_batches, world, 0, report, val_metrics)
        step = start_step
        while step < config.iters:
            tic = time.perf_counter()
            tokens, accumulated = 0, None
            for _ in range(config.grad_accum):
                batch = next(data, None)
                if batch is None:
                    break
                accumulated = accumulate_fn(batch.inputs, accumulated)
                tokens += batch.tokens
                if config.grad_accum > 1:
                    mx.eval(accumulated)
            if batch is None:
                break
            grads, loss, norm, aux = reduce_fn(accumulated)
            mx.eval(grads, loss, norm, aux)
            loss_value, norm_value = loss.item(), norm.item()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):  # checked BEFORE the update
                raise Llama2MLXError(
                    f"training stopped at step {step + 1}: the loss is {loss_value} and the gradient norm "
                    f"{norm_value}; the step was not applied; {_kept(result.checkpoint)} (try a lower --lr)"
                )
            update_fn(grads)
            mx.eval(model.state, optimizer.state)
            step += 1
            window.add(loss_value, tokens, time.perf_counter() - tic, aux)
            result.step, result.train_loss = step, loss_value
            if step % config.report_every == 0 or step == config.iters:
                report(window.record(step, optimizer, world))
            if val_batches is not None and (
                step == config.iters or (config.eval_every and step % config.eval_every == 0)
            ):
                result.val_loss = _validate(evaluate_fn, model, val_batches, world, step, report, val_metrics)
            if step == config.iters or (config.save_every and step % config.save_every == 0):
                save(step)
            if stop():  # the unreported steps stay in the checkpoint's window: resume reports them as usual
                save(step)
                result.status = "interrupted"
                break
    if result.step < config.iters and result.status == "finished":
        save(result.step)  # the data ran out before `iters`: keep what was trained
    return result


def _kept(checkpoint: Path | None) -> str:
    return f"the last good checkpoint is in {checkpoint}" if checkpoint else "no checkpoint was written"


def _compile_steps(
    model: nn.Module, optimizer: optim.Optimizer, loss_fn: LossFn, clip_norm: float | None, world
):
    """Compiled (1) gradients of one micro-batch added to those accumulated, (2) the step's mean gradient, loss and
    gradient norm, (3) the optimizer update. The loop checks the loss and norm between (2) and (3), so a non-finite
    step never reaches the weights or the optimizer state.

    Gradients of the loss SUM are added up, all-reduced, then divided by the total weight: the mean over every
    trained token of the global batch, whatever the split into micro-batches and ranks.
    """
    state = [model.state, optimizer.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, loss_fn)
    size = world.size()

    @partial(mx.compile, inputs=state, outputs=state)
    def accumulate(inputs, accumulated):
        outputs, grads = value_and_grad(model, *inputs)
        aux = tree_map(lambda a: a.astype(mx.float32), outputs[2]) if len(outputs) > 2 else {}
        step = (grads, outputs[0].astype(mx.float32), outputs[1].astype(mx.float32), aux)
        return step if accumulated is None else tree_map(mx.add, step, accumulated)

    @partial(mx.compile, inputs=state, outputs=state)
    def reduce(accumulated):
        grads, total, weight, aux = accumulated
        if size > 1:
            # average_gradients divides by the size; multiply back to get the sum over ranks
            grads = tree_map(lambda g: g * size, average_gradients(grads))
            total, weight = mx.distributed.all_sum(total), mx.distributed.all_sum(weight)
            aux = tree_map(mx.distributed.all_sum, aux)
        grads = tree_map(lambda g: g / weight, grads)
        if clip_norm:
            grads, norm = optim.clip_grad_norm(grads, clip_norm)
        else:
            norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
        return grads, total / weight, norm, aux

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads):
        optimizer.update(model, grads)

    return accumulate, reduce, update


def _compile_eval(model: nn.Module, loss_fn: LossFn):
    @partial(mx.compile, inputs=[model.state])
    def evaluate(inputs):
        total, weight = loss_fn(model, *inputs)[:2]
        return total.astype(mx.float32), weight.astype(mx.float32)

    return evaluate


def _validate(evaluate_fn, model, val_batches, world, step: int, report, val_metrics=None) -> float:
    """Mean validation loss over every batch (sum / weight, all-reduced over ranks), plus `val_metrics`."""
    model.eval()
    total, weight = mx.array(0.0), mx.array(0.0)
    for batch in val_batches():
        batch_total, batch_weight = evaluate_fn(batch.inputs)
        total, weight = total + batch_total, weight + batch_weight
        mx.eval(total, weight)
    extra = val_metrics(model) if val_metrics is not None else {}
    model.train()
    if world.size() > 1:
        total, weight = mx.distributed.all_sum(total), mx.distributed.all_sum(weight)
    if weight.item() == 0:
        raise Llama2MLXError("the validation set has no tokens to score")
    val_loss = (total / weight).item()
    report({"step": step, "val_loss": val_loss, **extra})
    return val_loss


class _Window:
    """Training statistics since the last report."""

    def __init__(self) -> None:
        self.trained_tokens = 0
        self.reset()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run reports exactly what an uninterrupted one would."""
        return {"trained_tokens": self.trained_tokens, "losses": self.losses, "tokens": self.tokens,
                "aux": self.aux}  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        self.trained_tokens, self.losses, self.tokens = (
            state["trained_tokens"],
            state["losses"],
            state["tokens"],
        )
        self.aux = {name: list(sums) for name, sums in state.get("aux", {}).items()}

    def reset(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.seconds = 0.0
        self.aux: dict[str, list[float]] = {}  # name -> [sum, count] of the loss function's metrics

    @property
    def steps(self) -> int:
        return len(self.losses)

    def add(self, loss: float, tokens: int, seconds: float, aux: dict | None = None) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.seconds += seconds
        for name, (total, count) in (aux or {}).items():
            sums = self.aux.setdefault(name, [0.0, 0.0])
            sums[0] += total.item()
            sums[1] += count.item()

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
            **{name: total / count for name, (total, count) in self.aux.items() if count},
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
                + f"step {record['step']}/{self.total}  val_loss {record['val_loss']:.4f}"
                + (f"  val_accuracy {record['val_accuracy']:.3f}" if "val_accuracy" in record else "")
                + "\n"
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
    """metrics.jsonl: one JSON object per report. On resume, records after the checkpoint's step are dropped, and so
    is a torn last line (what a power cut during a write leaves)."""

    def __init__(self, path: Path, keep_until: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line, record in _records(path) if keep_until and record["step"] <= keep_until]
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def on_report(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each readable line of metrics.jsonl that has a step."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append((line, record))
    return records


def save_checkpoint(
    model: nn.Module,
    optimizer: optim.Optimizer,
    folder: Path,
    step: int,
    position: int,
    world_size: int,
    window: _Window | None = None,
    kept: Path | None = None,
) -> None:
    """Trainable weights, optimizer state, step, RNG key, data position and the unreported steps' statistics,
    replaced atomically as one folder. Non-finite weights are never written: the run stops instead."""
    from llama2_mlx.destination import atomic_folder

    weights = dict(tree_flatten(model.trainable_parameters()))
    optimizer_state = dict(tree_flatten(optimizer.state))
    if not all(mx.all(mx.isfinite(v)).item() for v in [*weights.values(), *optimizer_state.values()]):
        raise Llama2MLXError(
            f"training stopped at step {step}: the weights became non-finite (nan/inf) and were not saved; "
            f"{_kept(kept)} (try a lower --lr)"
        )
    key = mx.random.state[0].tolist()
    state = {"step": step, "data_position": position, "rng_key": key, "world_size": world_size}
    if window is not None:
        state["window"] = window.state()
    with atomic_folder(folder, force=True) as tmp:
        mx.save_safetensors(str(tmp / "trainable.safetensors"), weights)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), optimizer_state)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def load_checkpoint(
    model: nn.Module, optimizer: optim.Optimizer, folder: Path, window: _Window | None = None
) -> int:
    """Restore what `save_checkpoint` wrote; returns the step to continue from."""
    from llama2_mlx.fileio import read_json

    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        raise Llama2MLXError(f"{folder}: no checkpoint to resume from (trainer_state.json missing)")
    state = read_json(state_file, "--resume")
    if not (
        isinstance(state, dict)
        and all(isinstance(state.get(k), int) and state[k] >= 0 for k in ("step", "data_position"))
        and isinstance(state.get("rng_key"), list)
        and len(state["rng_key"]) == 2
        and all(isinstance(k, int) and 0 <= k < 2**32 for k in state["rng_key"])
    ):
        raise Llama2MLXError(f"{state_file}: corrupt trainer state; start again with a new --out")
    world_size = mx.distributed.init().size()
    if state.get("world_size", 1) != world_size:
        raise Llama2MLXError(
            f"{state_file}: saved with {state['world_size']} process(es), resuming with {world_size}; "
            "the data position would not match"
        )
    weights = _load_tensors(folder / "trainable.safetensors")
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected):
        raise Llama2MLXError(
            f"{folder}: the checkpoint's trainable tensors do not match this model and settings"
        )
    for name, array in weights.items():
        if array.shape != expected[name].shape:
            raise Llama2MLXError(
                f"{folder}: tensor {name} has shape {tuple(array.shape)} in the checkpoint, "
                f"{tuple(expected[name].shape)} with these settings"
            )
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(_load_tensors(folder / "optimizer.safetensors").items()))
    high, low = state["rng_key"]
    mx.random.seed((high << 32) | low)
    mx.eval(model.parameters(), optimizer.state)
    saved_window = state.get("window")
    if window is not None and saved_window is not None:
        if not (
            isinstance(saved_window, dict)
            and isinstance(saved_window.get("trained_tokens"), int)
            and isinstance(saved_window.get("tokens"), int)
            and isinstance(saved_window.get("losses"), list)
            and all(isinstance(x, int | float) for x in saved_window["losses"])
        ):
            raise Llama2MLXError(
                f"{state_file}: corrupt trainer state (window); start again with a new --out"
            )
        window.restore(saved_window)
    return state["step"]


def _load_tensors(path: Path) -> dict[str, mx.array]:
    from llama2_mlx.checkpoints.safetensors_file import load_safetensors

    return load_safetensors(path)


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
