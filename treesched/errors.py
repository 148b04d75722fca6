"""The one exception type treesched raises for bad input.

Every user-facing check raises :class:`TreeschedError` (a ``ValueError``) with
a message that names the problem, so callers can catch one type and the CLI
can print one line instead of a traceback.
"""


class TreeschedError(ValueError):
    """Bad input or an impossible request: the message says which and why."""


class DivergenceError(TreeschedError):
    """A computation produced a non-finite value (a loss, a gradient norm or
    an updated parameter): training diverged.  Nothing was updated."""
