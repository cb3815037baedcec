"""A synthetic "small assistant" world whose answers a program can check (the demo model's data).

Skills (arithmetic, counting letters, sorting, fact lookups, follow-ups that refer to earlier turns) with short,
formulaic answers, and system-prompt style instructions whose adherence is checked at every turn. `write_world`
writes the pretraining corpus, SFT dialogs, graded preference pairs and held-out prompts with their checks.
"""

from llama2_mlx.world.skills import check_answer
from llama2_mlx.world.styles import STYLES, get_style
from llama2_mlx.world.writer import DEFAULT_SIZES, parse_sizes, write_examples, write_world

__all__ = [
    "DEFAULT_SIZES",
    "STYLES",
    "check_answer",
    "get_style",
    "parse_sizes",
    "write_examples",
    "write_world",
]
