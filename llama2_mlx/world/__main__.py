"""`python -m llama2_mlx.world ...` runs `llama2-mlx world ...` (through the CLI group, for its error handling)."""

import sys

from llama2_mlx.cli import cli

cli(["world", *sys.argv[1:]], prog_name="llama2-mlx")
