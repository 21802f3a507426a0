"""Console output for the command line: a one-line progress display and plain-text tables."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from typing import TextIO


class Progress:
    """A status line on stderr, rewritten in place on a terminal and printed as plain lines
    otherwise (a log file or CI). `transient` messages, such as a per-run counter, are shown on a
    terminal only, so that a log gets one line per phase rather than one per call."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and _isatty(self.stream)
        self._width = 0

    def show(self, text: str, transient: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            # A line that wraps can no longer be rewritten with "\r".
            text = text[: shutil.get_terminal_size().columns - 1]
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        elif not transient:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Erase the status line, so that what is printed next starts on a clean line."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()
) -> list[str]:
    """Lines of a plain-text table, two spaces of indent; columns in `right` align right."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return ("  " + "  ".join(parts)).rstrip()

    return [line(list(headers)), *(line(r) for r in cells)]
