"""`python cli.py ...` from a checkout runs the same CLI as the installed `llama2-mlx` command."""

from llama2_mlx.cli import main

if __name__ == "__main__":
    main()
