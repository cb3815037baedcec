"""PyTorch references the MLX code is checked against (tests only; never imported by the library)."""
