"""The one check of a count given by a user: an integer in a range.

Used by the API (``positive_int`` / ``checked_int``: Python and NumPy
integers; ``True`` is not a count) and by the command line (``parse_int``:
the text of an option), so every place says the same thing in the same words.
"""

from __future__ import annotations

import numbers
import re

from .errors import TreeschedError


def _kind(minimum: int) -> str:
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    return f"an integer >= {minimum}"


def checked_int(name: str, value, minimum: int = 1, most: int | None = None) -> int:
    """``value`` as an int if it is an integer in ``minimum .. most``; else TreeschedError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise TreeschedError(f"{name} must be {_kind(minimum)}, got {value!r}")
    if most is not None and value > most:
        raise TreeschedError(f"{name} must be at most {most}, got {value}")
    return int(value)


def positive_int(name: str, value, most: int | None = None) -> int:
    """:func:`checked_int` with ``minimum = 1``."""
    return checked_int(name, value, 1, most)


# ASCII digits only: Python's int() also takes "1_000", full-width "\uff18"
# and other Unicode decimal digits, which no option means.  At most 40
# digits, so a pasted wall of digits is refused before it is converted.
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,40}")


def parse_int(text, name: str, minimum: int = 1, most: int | None = None) -> int:
    """The option text ``text`` as an integer in ``minimum .. most`` (``"12"``, not ``"1.5"``,
    ``"1_000"`` or non-ASCII digits)."""
    stripped = str(text).strip()
    if _INTEGER_TEXT.fullmatch(stripped) is None:
        raise TreeschedError(f"{name} must be {_kind(minimum)}, got {text!r}")
    return checked_int(name, int(stripped), minimum, most)


__all__ = ["checked_int", "positive_int", "parse_int"]
