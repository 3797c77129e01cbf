"""Run inside a private mount namespace (``unshare -rm``, see test_bad_inputs.py) where ``<dir>/full`` is a
tmpfs filled to the last byte and ``<dir>/ro`` a read-only tmpfs: the CLI and the storage layer on a disk
that is full and one that is read-only. Prints one JSON object: case -> {exit, output} or {error, permanent}.

    unshare -rm sh -c 'mount -t tmpfs -o size=64k tmpfs D/full && mount -t tmpfs -o ro tmpfs D/ro &&
                       python tests/flows/disk_faults.py D'
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's code, whatever is installed

from typer.testing import CliRunner  # noqa: E402

from flows.cli import app  # noqa: E402
from tasks.common import storage  # noqa: E402
from tasks.common.config import load_config  # noqa: E402
from tasks.common.errors import is_permanent  # noqa: E402


def fill(folder: Path) -> int:
    """Write into ``folder`` until the disk is full; the bytes it took."""
    written = 0
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                written += fh.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    return written


def failure(call) -> dict:
    try:
        call()
    except Exception as err:  # noqa: BLE001  (the case reports what it raised)
        return {"error": str(err), "type": type(err).__name__, "permanent": is_permanent(err)}
    return {"error": None}


def main(base: Path) -> None:
    runner = CliRunner()
    fill(base / "full")
    results = {}
    for case, args in {
        "read-only root, at load": ["stage", "captions", "--set", f"output_root={base}/ro/run"],
        "disk full, a command's write": ["index", "--set", f"output_root={base}/full/run"],
    }.items():
        result = runner.invoke(app, args)
        results[case] = {"exit": result.exit_code, "output": result.output}
    results["read-only root, a stage's write"] = failure(
        lambda: storage.write_bytes_atomic(f"{base}/ro/run/captions/x/part-00000/captions.parquet", b"x"))

    def captions_on_full_disk() -> None:
        from tasks.captions.stage import run

        run(load_config("demo", [f"output_root={base}/full/stage"]), 0)

    results["disk full, a stage's write"] = failure(captions_on_full_disk)
    results["markers"] = [str(p) for p in base.rglob("_SUCCESS.json")]
    print(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
