"""The world's fact tables: a closed set of facts the model must memorise and the lookup skill asks about.

The countries are made up so that the demo model cannot have seen them anywhere else; the colours are real.
Keys of COLOURS carry their article so that questions and answers read naturally ("What colour is a plum?").
"""

from __future__ import annotations

CAPITALS: dict[str, str] = {
    "Norland": "Vesk",
    "Brask": "Tolm",
    "Quenia": "Ardo",
    "Mirel": "Pasko",
    "Dovia": "Kel",
    "Zanth": "Orbo",
    "Felm": "Riva",
    "Gorsk": "Lune",
}

COLOURS: dict[str, str] = {
    "a banana": "yellow",
    "grass": "green",
    "the sky": "blue",
    "snow": "white",
    "coal": "black",
    "a tomato": "red",
    "a carrot": "orange",
    "a plum": "purple",
}

TABLES: dict[str, dict[str, str]] = {"capitals": CAPITALS, "colours": COLOURS}

# Words whose letters the counting skill asks about, and words the sorting skill sorts (all distinct).
COUNT_WORDS: tuple[str, ...] = (
    "apple", "banana", "carrot", "letter", "little", "mirror", "pepper", "rabbit", "summer", "coffee",
    "balloon", "cherry", "dinner", "hello", "kitten", "puzzle", "tomato", "yellow", "grass", "window",
)  # fmt: skip
SORT_WORDS: tuple[str, ...] = (
    "apple", "date", "fig", "grape", "kiwi", "lemon", "lime", "mango", "melon", "peach", "pear", "plum",
)  # fmt: skip
