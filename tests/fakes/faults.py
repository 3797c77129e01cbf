"""Faults placed by a count, never by time: the N-th write through `tasks.common.storage`, in this process
or in another one.

    with KillAfterWrites(2, chunks_of("judge")):   # the 3rd checkpoint chunk write, and every later write,
        run_judge(cfg, 0)                          # raise Killed: the process is "dead" after the 2nd

    proc = subprocess.Popen(stop_after_writes(2, "*/_progress/*/chunk-*.parquet", "-m", "flows.generate", ...))
    wait_stopped(proc.pid)                          # it stopped itself (SIGSTOP) right after its 2nd chunk
    os.killpg(proc.pid, signal.SIGKILL)             # a SIGKILL at exactly that place

`python tests/fakes/faults.py --after N --glob PATTERN -- <python arguments>` runs a Python program (`-m module
...` or `-c code ...`) that stops itself with SIGSTOP right after its N-th write whose path matches PATTERN
(fnmatch), so a test can SIGKILL it there: the state on disk is then exactly N such writes.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Killed(BaseException):
    """A simulated SIGKILL: a BaseException, so no `except Exception` in the code under test catches it."""


def chunks_of(stage: str) -> Callable[[str], bool]:
    """Writes of ``stage``'s checkpoint chunks (`{stage}/<hash>/part-N/_progress/<hash>/chunk-*.parquet`)."""
    return lambda url: f"/{stage}/" in url and "/_progress/" in url and fnmatch.fnmatch(url, "*/chunk-*.parquet")


class KillAfterWrites:
    """The first ``after`` writes that ``matches`` go through; the next matching write, and every write after
    it, raises :class:`Killed` without writing (a killed process writes nothing more). ``seen`` counts the
    matching writes attempted."""

    def __init__(self, after: int, matches: Callable[[str], bool] = lambda url: True):
        from tasks.common import storage

        self.after, self.matches, self.seen, self.dead = after, matches, 0, False
        self._storage = storage
        self._write = storage.write_bytes_atomic
        self._lock = threading.Lock()

    def write(self, url: str, data: bytes) -> None:
        with self._lock:
            if not self.dead and self.matches(url):
                self.seen += 1
                self.dead = self.seen > self.after
            if self.dead:
                raise Killed(f"killed before writing {url} (after {self.after} matching writes)")
        self._write(url, data)

    def __enter__(self) -> KillAfterWrites:
        self._storage.write_bytes_atomic = self.write
        return self

    def __exit__(self, *exc) -> None:
        self._storage.write_bytes_atomic = self._write


def stop_after_writes(after: int, pattern: str, *python_args: str) -> list[str]:
    """The command line that runs ``python python_args...`` and stops it after its ``after``-th matching write."""
    return [sys.executable, str(Path(__file__).resolve()), "--after", str(after), "--glob", pattern, "--", *python_args]


def wait_stopped(pid: int, deadline_s: float = 600) -> None:
    """Wait until process ``pid`` is stopped (it stopped itself at its fault); fails if it ends first.
    (The deadline only ends a test whose process hangs; the fault's place does not depend on it.)"""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            raise AssertionError(f"process {pid} ended before its fault") from None
        if state in ("T", "t"):
            return
        if state == "Z":
            raise AssertionError(f"process {pid} ended before its fault")
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not reach its fault in {deadline_s:.0f} s")


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = 120) -> None:
    """Wait for ``condition`` (a state, never a duration); the deadline only ends a test that hangs."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _install_stop(after: int, pattern: str) -> None:
    from tasks.common import storage

    write, lock, seen = storage.write_bytes_atomic, threading.Lock(), [0]

    def counted(url: str, data: bytes) -> None:
        write(url, data)
        if fnmatch.fnmatch(url, pattern):
            with lock:
                seen[0] += 1
                stop = seen[0] == after
            if stop:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGSTOP)

    storage.write_bytes_atomic = counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--after", type=int, required=True)
    parser.add_argument("--glob", required=True)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.path.insert(0, str(ROOT))
    _install_stop(args.after, args.glob)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    elif rest[0] == "-c":
        sys.argv = ["-c", *rest[2:]]
        exec(compile(rest[1], "<fault target>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit("expected -m MODULE ... or -c CODE ...")


if __name__ == "__main__":
    main()

