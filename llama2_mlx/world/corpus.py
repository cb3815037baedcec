"""The pretraining corpus: plain-text documents (one a line) of facts and dialog transcripts.

Pretraining teaches the facts and the skills' worked answers without the chat format; the chat format and the
habit of following system instructions come from fine-tuning, so the fine-tuned model has something to add.
"""

from __future__ import annotations

import random
from collections.abc import Collection

from llama2_mlx.world.dialogs import KINDS, draw_dialog
from llama2_mlx.world.facts import TABLES
from llama2_mlx.world.formats import transcript
from llama2_mlx.world.skills import fact_sentence


def documents(count: int, rng: random.Random, exclude: Collection[str] = ()) -> list[str]:
    """`count` documents: a fifth state 2-4 facts, the rest are transcripts of dialogs of every kind."""
    facts = [(table, key) for table in sorted(TABLES) for key in TABLES[table]]
    lines = []
    for _ in range(count):
        if rng.random() < 0.2:
            lines.append(" ".join(fact_sentence(*fact) for fact in rng.sample(facts, rng.randint(2, 4))))
        else:
            lines.append(transcript(draw_dialog(rng.choice(KINDS), rng, exclude)))
    return lines
