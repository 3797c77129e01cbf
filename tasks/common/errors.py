"""Errors a retry cannot fix, told apart from those it can.

A stage that fails because of the config, the data, a missing input, a missing model, a server that
refuses the key, or a disk that is full, read-only or not a folder is not retried (Prefect's task
retries and the CLI both ask :func:`is_permanent`), and the CLI prints its message on one line with
exit code 2. Anything else (a dropped connection, an out-of-memory the batch halving could not
absorb, a node lost, an I/O error of a flaky mount) may pass on a retry.
"""

from __future__ import annotations

import errno


class PermanentError(Exception):
    """Mixed into every EditForge error that a second attempt would meet again."""


# built-in kinds that are deterministic in this code base: bad values or types, a missing key or file
_PERMANENT_BUILTINS = (ValueError, TypeError, LookupError, NotImplementedError, FileNotFoundError, PermissionError,
                       NotADirectoryError, IsADirectoryError)
# OSErrors of a write that a retry seconds later meets again (storage.WriteError names the path and the fix)
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                              errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG})


def is_permanent(err: BaseException) -> bool:
    return isinstance(err, (PermanentError, *_PERMANENT_BUILTINS)) or (
        isinstance(err, OSError) and err.errno in PERMANENT_ERRNOS)
