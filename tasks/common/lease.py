"""One writer per partition: a lease file (`{stage}/_leases/part-NNNNN.json`) held while a process works on it.

A process creates the lease exclusively (``O_EXCL`` locally; see :func:`storage.create_exclusive` for
object stores), refreshes its heartbeat from a background thread and removes it when done. Another
process that wants the same partition waits (logging who holds it) until the lease is released, then
looks at the partition again — usually to find it finished and skip it — so two runs on one
`output_root` never write, or clean up, the same partition at once. A lease whose owner is gone is
taken over: on the same host when its process no longer exists, anywhere when its heartbeat is older
than ``EDITFORGE_LEASE_TTL_S`` (600 s by default; the heartbeat comes every third of that).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from tasks.common import storage
from tasks.common.errors import PermanentError

log = logging.getLogger("editforge")
TTL_ENV = "EDITFORGE_LEASE_TTL_S"
DEFAULT_TTL_S = 600.0


class LeaseSettingError(PermanentError, ValueError):
    """``EDITFORGE_LEASE_TTL_S`` is not a positive number of seconds (the message names it)."""


def lease_ttl_s() -> float:
    """Seconds without a heartbeat after which a lease is taken over (``EDITFORGE_LEASE_TTL_S``, 600)."""
    raw = os.environ.get(TTL_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TTL_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        shown = raw if len(raw) <= 40 else raw[:37] + "..."
        raise LeaseSettingError(f"{TTL_ENV}={shown!r}: expected a positive number of seconds (e.g. 600, the default "
                                f"when it is unset); unset it or set e.g. {TTL_ENV}=600")
    return value


def read_lease(url: str) -> dict[str, Any] | None:
    """The lease at ``url`` (None when nobody holds it; ``{}`` when it cannot be read)."""
    fs, path = storage.filesystem(url)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}


def is_stale(held: dict[str, Any], ttl_s: float | None = None) -> bool:
    """Its owner is gone: a process of this host that no longer exists, or no heartbeat for ``ttl_s``."""
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not storage.pid_alive(held["pid"]):
        return True
    return time.time() - float(held.get("heartbeat", 0)) > (lease_ttl_s() if ttl_s is None else ttl_s)


class PartitionLease:
    """``with PartitionLease(url): ...`` — hold the lease at ``url`` (:func:`layout.lease_url`) for the block."""

    def __init__(self, url: str, logger: logging.Logger | None = None, poll_s: float = 0.5):
        self.url = url
        self.logger = logger or log
        self.poll_s = poll_s
        self.ttl_s = lease_ttl_s()
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def _read(self) -> dict[str, Any] | None:
        return read_lease(self.url)  # {} while being written or damaged: judged by its age

    def _stale(self, held: dict[str, Any]) -> bool:
        return is_stale(held, self.ttl_s)

    def acquire(self) -> None:
        announced = False
        while not storage.create_exclusive(self.url, self._record()):
            held = self._read()
            if held is None:
                continue  # released in between
            if self._stale(held):
                if self._read() == held:  # still the same dead owner's
                    self.logger.warning("partition lease %s of %s (pid %s) is stale: taking it over", self.url,
                                        held.get("host"), held.get("pid"))
                    storage.remove(self.url)
                continue
            if not announced:
                self.logger.info("waiting for %s: held by %s pid %s", self.url, held.get("host"), held.get("pid"))
                announced = True
            time.sleep(self.poll_s)
        self._thread = threading.Thread(target=self._beat, name="editforge-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            held = self._read()
            if not held or held.get("token") != self.owner["token"]:
                self.logger.warning("partition lease %s was taken over by another process", self.url)
                return
            storage.write_bytes_atomic(self.url, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held and held.get("token") == self.owner["token"]:
            storage.remove(self.url)

    def __enter__(self) -> PartitionLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
