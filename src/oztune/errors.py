"""One error type for everything a user can get wrong.

The CLI catches :class:`OztuneError`, prints its message on one line and exits with code 2.
Messages name the file, line, column or field at fault and say what was expected.
"""


class OztuneError(Exception):
    """A user-facing error: bad input file, unknown column, missing model, bad option value."""


class DataError(OztuneError):
    """A data file that cannot be read as asked (missing, malformed, unknown column, bad label)."""


class ModelError(OztuneError):
    """A model name or directory that cannot be loaded (unknown name, no weights, key mismatch)."""
