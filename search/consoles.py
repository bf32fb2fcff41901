"""The one way msa-search makes a rich Console, for a terminal and for a pipe alike.

On a terminal rich wraps text and sizes tables to the window. Piped into a file or a log
(`make run | tee log`, nohup, CI) rich would assume 80 columns: a command printed for the user
to copy (`next: msa-search export EXP --out ...`) would break over two lines, and a table of
ten metrics would split its numbers over rows (`1.247` / `7 ±`). So off a terminal lines are
never wrapped and tables get PIPED_WIDTH columns, unless COLUMNS says otherwise (rich's own rule).
"""
from __future__ import annotations

import os
from typing import IO

from rich.console import Console

# Wide enough for the widest table we print (the papers' table: ten metrics of `mean ± std`).
PIPED_WIDTH = 200


def make_console(*, stderr: bool = False, file: IO[str] | None = None, highlight: bool = True) -> Console:
    """A Console without markup: paths and error texts (Ray's, gloo's) contain [brackets] that
    rich would otherwise parse as style tags and crash on."""
    console = Console(stderr=stderr, file=file, markup=False, highlight=highlight)
    if not console.is_terminal:
        console.soft_wrap = True
        if not os.environ.get("COLUMNS"):
            console.width = PIPED_WIDTH
    return console
