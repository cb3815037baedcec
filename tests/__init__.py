import llama2_mlx  # noqa: F401  (first: it loads OpenBLAS before anything imports mlx.core; see openblas.py)
