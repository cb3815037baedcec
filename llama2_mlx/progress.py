"""Progress of long commands on stderr: one line redrawn in place on a terminal, whole lines when piped.

A pipe or a log file gets a line at each tenth of the work (and at the end), each ending with a newline, so logs
neither run lines together with carriage returns nor print a line per tensor.
"""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """`update(done, total, detail)` as work advances (the library's progress callbacks have this shape);
    `close()` ends the line (or use `with`)."""

    def __init__(self, label: str, unit: str = "", scale: int = 1, stream: TextIO | None = None):
        """`scale`: shown amounts are divided by it (bytes shown as MB: unit " MB", scale 10**6)."""
        self.label, self.unit, self.scale = label, unit, scale
        self.total = 1
        self.stream = stream or sys.stderr
        self.in_place = self.stream.isatty()
        self.drawn = ""
        self.next_tenth = 1

    def update(self, done: int, total: int, detail: str = "") -> None:
        self.total = max(total, 1)
        fraction = min(done / self.total, 1.0)
        bar = "#" * int(20 * fraction)
        amounts = (
            f"{done}/{self.total}"
            if self.scale == 1
            else f"{done / self.scale:.1f}/{self.total / self.scale:.1f}"
        )
        line = f"{self.label} [{bar:.<20}] {amounts}{self.unit}" + (f"  {detail}" if detail else "")
        if self.in_place:
            self.stream.write("\r" + line.ljust(len(self.drawn)))
            self.drawn = line
        elif fraction * 10 >= self.next_tenth:
            self.stream.write(line + "\n")
            self.next_tenth = int(fraction * 10) + 1
        self.stream.flush()

    def tensor(self, name: str, done: int, total: int) -> None:
        """The converters' callback shape: (tensor name, bytes done, bytes in all)."""
        self.update(done, total, name)

    def close(self) -> None:
        if self.in_place and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.drawn = ""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
