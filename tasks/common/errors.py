"""Errors a retry cannot fix, told apart from those it can.

A stage that fails because of the config, the data, a missing input, a missing model or a server
that refuses the key is not retried (Prefect's task retries and the CLI both ask
:func:`is_permanent`), and the CLI prints its message on one line with exit code 2. Anything else
(a dropped connection, an out-of-memory the batch halving could not absorb, a node lost) may pass on
a retry.
"""

from __future__ import annotations


class PermanentError(Exception):
    """Mixed into every EditForge error that a second attempt would meet again."""


# built-in kinds that are deterministic in this code base: bad values or types, a missing key or file
_PERMANENT_BUILTINS = (ValueError, TypeError, LookupError, NotImplementedError, FileNotFoundError, PermissionError)


def is_permanent(err: BaseException) -> bool:
    return isinstance(err, (PermanentError, *_PERMANENT_BUILTINS))
