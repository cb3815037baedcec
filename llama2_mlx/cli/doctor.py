"""`llama2-mlx doctor`: what this install runs on (versions, backend, BLAS and its speed, demo model, memory), the
first thing to paste into a bug report or to check when things are slow."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time

import click

PACKAGES = ("mlx", "mlx-lm", "numpy", "sentencepiece", "transformers", "torch")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def matmul_gflops(size: int = 512, repeats: int = 5) -> float:
    """float32 matrix-product speed on the default device: what the BLAS choice changes on a CPU."""
    import mlx.core as mx

    a, b = mx.random.normal((size, size)), mx.random.normal((size, size))
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def report() -> list[tuple[str, str]]:
    """(label, value) lines describing this install."""
    import mlx.core as mx

    from llama2_mlx import __version__
    from llama2_mlx.loading import demo_model_path
    from llama2_mlx.openblas import OPT_OUT, active_blas

    lines = [("llama2-mlx", __version__), ("python", f"{platform.python_version()} ({sys.executable})"),
             ("platform", platform.platform())]  # fmt: skip
    lines += [(package, _version(package)) for package in PACKAGES]
    lines.append(("backend", f"{mx.default_device()} (Metal available: {mx.metal.is_available()})"))
    blas = active_blas()
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        blas += f" ({OPT_OUT} is set)"
    lines.append(("BLAS", blas))
    lines.append(("matmul 512x512 float32", f"{matmul_gflops():.1f} GFLOP/s"))
    demo = demo_model_path()
    found = (demo / "config.json").is_file()
    lines.append(("demo model", f"{demo} ({'found' if found else 'MISSING'})"))
    memory = _memory_gb()
    lines.append(("memory", f"{memory:.1f} GB" if memory else "unknown"))
    return lines


@click.command()
def doctor() -> None:
    """Print versions, compute backend, the BLAS MLX calls and its speed, the demo model's location, and memory."""
    lines = report()
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        click.echo(f"{label.ljust(width)}  {value}")


COMMANDS: list[click.Command] = [doctor]
