"""`llama2-mlx plot RUN_DIR`: training and validation loss curves from a run's metrics.jsonl, drawn to a PNG.

matplotlib is optional (`pip install matplotlib`, or the `plot` extra); training never needs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llama2_mlx.errors import Llama2MLXError


def read_metrics(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, validation) lists of (step, loss) from RUN_DIR/metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise Llama2MLXError(f"{path}: missing; is {run_dir} a training run folder?")
    train, valid = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise Llama2MLXError(f"{path}:{number}: not valid JSON") from None
        if "val_loss" in record:
            valid.append((record["step"], record["val_loss"]))
        elif "loss" in record:
            train.append((record["step"], record["loss"]))
    if not train and not valid:
        raise Llama2MLXError(f"{path}: no loss records yet")
    return train, valid


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the loss curves of a run to `out` (default RUN_DIR/loss.png); returns the PNG's path."""
    try:
        import matplotlib
    except ImportError:
        raise Llama2MLXError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, valid = read_metrics(run_dir)
    target = Path(out) if out is not None else run_dir / "loss.png"
    figure, axes = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (valid, "validation", "o-")):
        if points:
            axes.plot(*zip(*points, strict=True), style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(run_dir.name)
    axes.legend()
    axes.grid(alpha=0.3)
    tmp = target.with_name(f".{target.stem}.tmp.png")
    figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, target)
    return target
