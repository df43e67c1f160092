"""The one exception type users see.

Anything raised as :class:`VaecoreError` is a problem with the user's input or environment; the
command line prints its message on one line and exits non-zero. Anything else is a bug in vaecore
and keeps its traceback.
"""


class VaecoreError(Exception):
    """A problem the user can fix, described in one line."""


class DataError(VaecoreError):
    """A data set or file that cannot be read as described."""


class CheckpointError(VaecoreError):
    """A checkpoint that is missing, corrupt, foreign or from an incompatible version."""


def reason(e: Exception) -> str:
    """An exception as a few words for a one-line error: its message, or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__
