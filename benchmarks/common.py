"""Helpers shared by the benchmark scripts: timing with warm-up, and the machine description for the record."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import mlx.core as mx


def time_call(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of `fn()` (its result is evaluated), after `warmup` untimed calls."""
    for _ in range(warmup):
        mx.eval(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_pair(
    ours: Callable[[], object], theirs: Callable[[], object], rounds: int = 5, repeats: int = 5
) -> tuple[float, float]:
    """Median seconds of each side, measured in alternating rounds so that drifting machine load hits both alike."""
    ours_samples, theirs_samples = [], []
    for _ in range(rounds):
        ours_samples.append(time_call(ours, repeats=repeats, warmup=1))
        theirs_samples.append(time_call(theirs, repeats=repeats, warmup=1))
    return statistics.median(ours_samples), statistics.median(theirs_samples)


def machine() -> str:
    from llama2_mlx.openblas import active_blas

    blas = "BLAS " + active_blas()
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__} "
        f"on {mx.default_device()}, {blas}"
    )
