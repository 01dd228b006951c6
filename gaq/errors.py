"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

import difflib
import re
from collections.abc import Iterable

# ANSI escape sequences (colours, bold: torch and other libraries put them in their
# messages) and other control characters, which a terminal or a log file would garble
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def did_you_mean(name: object, known: Iterable[str], n: int = 1) -> str:
    """``"did you mean 'x'?"`` (or ``'x' or 'y'`` for ``n`` > 1) for the known names close
    to a misspelt ``name``, or ``""`` when none is close: the one spelling of the hint in
    every "unknown ..." message."""
    close = difflib.get_close_matches(str(name), list(known), n=n, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def one_line(text: object) -> str:
    """``text`` as one clean line: escape sequences and control characters dropped, line
    breaks and runs of spaces made single spaces (what the command line prints)."""
    return " ".join(_ESCAPES.sub("", str(text)).split())


class GaqError(Exception):
    """An error caused by input the user can fix; the message says what and how."""


class DivergedError(GaqError):
    """A computation on valid input produced NaN or infinite values (a calibration that
    diverged, a quantized model sampling NaN). It belongs to one benchmark cell, not to the
    sweep: the runner records the cell as failed and goes on with the others."""
