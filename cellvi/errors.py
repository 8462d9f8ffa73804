"""cellvi's error classes: each subclasses the built-in a caller would expect, so that
``except ValueError`` keeps working, and :class:`CellviError` catches them all.

Every message says what is wrong and what to do about it.
"""

from __future__ import annotations

__all__ = ["CellviError", "InvalidInputError", "InvalidTypeError", "MissingKeyError",
           "ModelFileError"]


class CellviError(Exception):
    """Base of every error cellvi raises on purpose."""


class InvalidInputError(CellviError, ValueError):
    """The data or a setting has a value cellvi cannot use (NaN, negative counts, ...)."""


class InvalidTypeError(CellviError, TypeError):
    """An argument has the wrong type (a string where a seed goes, ...)."""


class MissingKeyError(CellviError, KeyError):
    """A layer, obs column, marker or saved field is not there."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ModelFileError(CellviError, ValueError):
    """A saved model folder is damaged, tampered with or not cellvi's; nothing was built."""
