"""In-package OpenBLAS on Linux (on unless opted out, never on macOS, never after MLX is loaded) and `doctor`."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from llama2_mlx import openblas
from llama2_mlx.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import llama2_mlx, mlx.core; from llama2_mlx.openblas import active_blas; print(active_blas())"


def _blas_in_fresh_process(**env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", openblas.OPT_OUT)} | env
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=environment, capture_output=True,
                            text=True, check=True)  # fmt: skip
    return result.stdout.strip()


def test_importing_the_package_makes_mlx_use_openblas():
    installed = ctypes.util.find_library("openblas") is not None
    active = _blas_in_fresh_process()
    if installed:
        assert "libopenblas" in Path(active).name, active
    else:  # a machine without OpenBLAS keeps MLX's own BLAS and says how to get the fast one
        assert active.startswith("MLX's bundled reference BLAS") and "libopenblas0" in active
    assert _blas_in_fresh_process(**{openblas.OPT_OUT: "1"}).startswith("MLX's bundled reference BLAS")


def test_preload_only_on_linux_and_before_mlx(monkeypatch):
    loaded = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name, mode=0: loaded.append(name))
    monkeypatch.delenv(openblas.OPT_OUT, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    openblas.preload()
    assert loaded == []
    monkeypatch.setattr(sys, "platform", "linux")
    openblas.preload()  # mlx.core is already imported in this test process: too late to change its BLAS
    assert loaded == []
    monkeypatch.delitem(sys.modules, "mlx.core")
    openblas.preload()
    assert loaded == ["libopenblas.so.0"]
    monkeypatch.setenv(openblas.OPT_OUT, "1")
    openblas.preload()
    assert loaded == ["libopenblas.so.0"]


def test_doctor_reports_versions_blas_and_demo_model():
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert lines["llama2-mlx"] == "0.1.0"
    assert lines["mlx-lm"] == importlib.metadata.version("mlx-lm")
    assert lines["BLAS"].startswith(openblas.active_blas())  # plus a note when LLAMA2_MLX_NO_OPENBLAS is set
    assert lines["demo"].endswith("weights/demo (found)")  # the label is "demo model"
    assert lines["matmul"].endswith("GFLOP/s")
