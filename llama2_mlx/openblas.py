"""A fast BLAS for MLX on Linux: load the system's OpenBLAS before `mlx.core` is first imported.

MLX's Linux CPU wheel links a bundled reference BLAS: its matrix products run at 4-6 GFLOP/s on a 2-core box,
against 80-170 GFLOP/s with OpenBLAS. A library loaded earlier with RTLD_GLOBAL wins symbol lookup, so loading
`libopenblas.so.0` that way before MLX loads makes MLX call it, with no LD_PRELOAD. `llama2_mlx/__init__.py` calls
`preload()` first thing. Never on macOS (MLX uses Accelerate and Metal there). Opt out: LLAMA2_MLX_NO_OPENBLAS=1.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT = "LLAMA2_MLX_NO_OPENBLAS"
LIBRARIES = ("libopenblas.so.0", "libopenblas.so")
INSTALL_HINT = "apt-get install libopenblas0 (Debian/Ubuntu) or dnf install openblas (Fedora)"


def preload() -> None:
    """Load OpenBLAS globally on Linux unless opted out, MLX is already loaded, or none is installed."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT, "") not in ("", "0"):
        return
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS symbols
        return
    for name in LIBRARIES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def active_blas() -> str:
    """Which BLAS MLX's matrix products call in this process: the library whose `cblas_sgemm` the dynamic linker
    finds in the global scope (OpenBLAS when preloaded), else MLX's own bundled one."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
        info = _DlInfo()
        if process.dladdr(address, ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(info.dli_fname.decode())
    except (AttributeError, OSError):
        pass
    return "MLX's bundled reference BLAS (slow; " + INSTALL_HINT + ")"


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]
