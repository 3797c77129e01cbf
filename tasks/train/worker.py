"""One training process of a launched job: `python -m tasks.train.worker SPEC.json` (started by torchrun, see
`tasks.train.launch`; never run by hand).

Trains with `tasks.train.loop.train_editing_model` on the spec's settings, shards and work folder; the
main process (global rank 0) logs the steps and writes `result.json` for the launcher. An error is
written to `failures/rank-NNNNN.json` in the work folder before the process exits with code 1. The
process stops when its launcher (the flow run, or `editforge train --node-rank K`) is gone, and dies
with its parent torchrun (Linux), so no worker outlives the run that owns the work folder.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from typing import Any

from tasks.train.launch import LAUNCHER_ENV, RESULT_FILE, read_spec, record_failure

log = logging.getLogger("editforge")


class LauncherGone(RuntimeError):
    """The process that launched this job has ended."""


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _check_launcher(_record: dict[str, Any]) -> None:
    pid = int(os.environ.get(LAUNCHER_ENV, "0"))
    if pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise LauncherGone(f"the launcher (pid {pid}) has ended: this training process stops") from None
        except PermissionError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"[rank {rank}] %(message)s")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)  # the steps, once
    spec = read_spec(argv[0])
    workdir = spec["workdir"]
    try:
        from tasks.train.loop import train_editing_model

        result = train_editing_model(spec["train"], spec["models"], spec["train_urls"], workdir,
                                     run_key=spec["run_key"], logger=log, on_step=_check_launcher)
        if rank == 0:
            tmp = workdir / f".{RESULT_FILE}.tmp"
            tmp.write_text(json.dumps(result.to_json()))
            os.replace(tmp, workdir / RESULT_FILE)
    except BaseException as err:  # noqa: BLE001 - reported to the launcher, then the process ends
        record_failure(workdir, rank, err)
        log.error("training process %d failed: %s", rank, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
