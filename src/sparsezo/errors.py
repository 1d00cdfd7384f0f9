"""One exception type for every user-facing failure.

The CLI turns a :class:`SparseZOError` into a single ``sparsezo: error: ...`` line and exit
code 2, so every message must say what went wrong, where, and how to fix it.
"""


class SparseZOError(Exception):
    """Bad input or an unusable file: shown to the user as one line, exit code 2."""
