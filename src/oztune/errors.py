"""One error type for everything a user can get wrong, and the checks of option values that many commands share.

The CLI catches :class:`OztuneError`, prints its message on one line and exits with code 2.
Messages name the file, line, column or field at fault and say what was expected.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Iterator
from contextlib import contextmanager


class OztuneError(Exception):
    """A user-facing error: bad input file, unknown column, missing model, bad option value."""


class DataError(OztuneError):
    """A data file that cannot be read as asked (missing, malformed, unknown column, bad label)."""


class ModelError(OztuneError):
    """A model name or directory that cannot be loaded (unknown name, no weights, key mismatch)."""


@contextmanager
def path_errors(what: str, error: type[OztuneError] = OztuneError) -> Iterator[None]:
    """Checks of a path the user gave (``exists``, ``is_dir``, ``resolve``, listing it): an OSError of theirs
    becomes a one-line ``error`` naming ``what`` (the option and its value), not a traceback. A name longer
    than the file system holds (ENAMETOOLONG: a component over 255 bytes) is said so."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise error(f"{what}: its name is too long for the file system ({e.strerror}); give a shorter one") from None
        raise error(f"{what}: cannot be checked ({e.strerror or e})") from None


def check_at_least_1(option: str, value: int | None) -> None:
    """A count option (``--batch-size``): None (not given) or at least 1; the one wording of every command."""
    if value is not None and value < 1:
        raise OztuneError(f"{option} must be at least 1, not {value}")


def check_positive(option: str, value: float | None) -> None:
    """A rate or scale option (``--lr``): None (not given) or a positive, finite number (nan and inf would train
    to a nan model); the one wording of every command."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise OztuneError(f"{option} must be a positive, finite number, not {value}")


def missing_package(e: ModuleNotFoundError, extra: str, what: str) -> OztuneError:
    """The one-line error for an optional package that is not installed (``e``, its import's failure): ``what``
    needs it, and the pip extra ``extra`` of pyproject.toml installs it (as ``--tensorboard`` says so).
    Raise it ``from None``: the traceback of a missing package tells a user nothing more."""
    package = (e.name or "").partition(".")[0] or "a package"
    return OztuneError(f"{what}, which needs the {package} package: pip install 'oztune[{extra}]' "
                       f"(in a clone of oztune: pip install -e \".[{extra}]\")")


# How to give each text its second text, and how to give texts alone: in a data file (or on the command line),
# and in a call of the Python API or a request to the server.
_PAIR_FIXES = {
    "file": ("give a file with a column of second texts (--text-pair-column C names it)",
             "give a file of single texts, or name its text column alone (--text-column C)"),
    "call": ("give text_pairs, one second text per text", "leave text_pairs out"),
}


def check_text_pairs(model_pairs: bool | None, pairs: bool, where: str, source: str = "file") -> None:
    """A DataError for texts of the other kind than the model was fine-tuned on (text pairs for a model of
    single texts, single texts for a model of pairs): its scores of them would mean nothing. The one check and
    wording of predict, evaluate, the training recipes' files, the Python API and the server.

    Args:
        model_pairs: whether the model was fine-tuned on text pairs; None (a model saved before oztune recorded
            it): both kinds are scored.
        pairs: whether the texts come with second texts.
        where: what holds the texts, named first in the message (a file, "texts").
        source: "file" (a data file or the command line) or "call" (the Python API or a request to the server,
            where second texts are ``text_pairs``): which fix the message gives.
    """
    if model_pairs is None or pairs == model_pairs:
        return
    given, trained = ("text pairs", "single texts") if pairs else ("single texts", "text pairs")
    raise DataError(f"{where}: {given}, but the model was fine-tuned on {trained} (its scores of {given} would "
                    f"mean nothing); {_PAIR_FIXES[source][pairs]}")
