"""One error type for everything a user can get wrong, and the checks of option values that many commands share.

The CLI catches :class:`OztuneError`, prints its message on one line and exits with code 2.
Messages name the file, line, column or field at fault and say what was expected.
"""

from __future__ import annotations

import math


class OztuneError(Exception):
    """A user-facing error: bad input file, unknown column, missing model, bad option value."""


class DataError(OztuneError):
    """A data file that cannot be read as asked (missing, malformed, unknown column, bad label)."""


class ModelError(OztuneError):
    """A model name or directory that cannot be loaded (unknown name, no weights, key mismatch)."""


def check_at_least_1(option: str, value: int | None) -> None:
    """A count option (``--batch-size``): None (not given) or at least 1; the one wording of every command."""
    if value is not None and value < 1:
        raise OztuneError(f"{option} must be at least 1, not {value}")


def check_positive(option: str, value: float | None) -> None:
    """A rate or scale option (``--lr``): None (not given) or a positive, finite number (nan and inf would train
    to a nan model); the one wording of every command."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise OztuneError(f"{option} must be a positive, finite number, not {value}")
