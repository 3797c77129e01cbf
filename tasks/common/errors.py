"""Errors a retry cannot fix, told apart from those it can: by intent, not by exception type.

Only the project's own :class:`PermanentError` family is permanent: a bad setting or input, a missing
input or model, a refused key, a disk that is full or read-only (each raised, or wrapped, where its
meaning is known, with a message naming the setting or file and the fix). Prefect's task retries and
the CLI both ask :func:`is_permanent`; the CLI prints a permanent error's message on one line with exit
code 2. Any other exception — a library's ``ValueError``, ``FileNotFoundError`` or ``OSError`` included,
whose meaning here is unknown — is retried (a flaky mount, a dropped connection, a node lost).
"""

from __future__ import annotations


class PermanentError(Exception):
    """Mixed into every EditForge error that a second attempt would meet again."""


class InputError(PermanentError, ValueError):
    """A value or a file's content that the code refuses; the message names it and how to fix it."""


class MissingFileError(PermanentError, FileNotFoundError):
    """A file or folder a setting names (or the run needs) is not there; the message names it."""


def is_permanent(err: BaseException) -> bool:
    """A retry would meet ``err`` again: it is one of the project's own permanent errors."""
    return isinstance(err, PermanentError)
