"""Storage through fsspec: local paths, file://, s3://, gs://, memory:// all work the same way.

Writes are atomic: on a local filesystem the bytes go to a temporary name in the same folder and are
renamed into place; on object stores a single PUT is already all-or-nothing. A reader therefore sees
either the whole file or no file — never a partial one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

# url -> sha256 of the bytes this process wrote there, while a `recording_writes()` block is open
_WRITTEN: ContextVar[dict[str, str] | None] = ContextVar("editforge_written", default=None)


@contextmanager
def recording_writes() -> Iterator[dict[str, str]]:
    """Record the sha256 of every file written (or moved) through this module inside the block.

    The stage contract hashes a partition's outputs for `_SUCCESS.json` from this record instead of
    reading every file back; files it did not see written (an earlier, interrupted run's) are read.
    Writes from other threads are not recorded (a context variable), so they are read back too.
    """
    record: dict[str, str] = {}
    token = _WRITTEN.set(record)
    try:
        yield record
    finally:
        _WRITTEN.reset(token)


def url_join(*parts: str) -> str:
    head, *rest = parts
    return "/".join([head.rstrip("/")] + [p.strip("/") for p in rest if p])


# Object stores (s3fs, gcsfs, ...) keep directory listings in memory with no expiry: a partition listed
# while another process was writing it would never be seen finished by this one. Never cache them.
_LOCAL = (None, "file", "local", "memory")


_OBJECT_STORE = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return set(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else {fs.protocol}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol = fsspec.core.split_protocol(str(url))[0]
    fs, path = fsspec.core.url_to_fs(url, **({} if protocol in _LOCAL else {"use_listings_cache": False}))
    return fs, path


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    if hasattr(fs, "max_concurrency"):  # s3fs: one GET, not a HEAD first to size a chunked download
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    record = _WRITTEN.get()
    if record is not None:
        record.pop(url, None)  # a failed write must not leave an old hash behind
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(parent or ".", exist_ok=True)
        _remove_dead_temps(path)
        tmp = f"{path}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        if parent and not _OBJECT_STORE.intersection(_protocols(fs)):  # no folders there: skip the request
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)
    if record is not None:
        record[url] = hashlib.sha256(data).hexdigest()


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


class UnreadableFileError(ValueError):
    """A file that is there but cannot be parsed (cut short, or not what its name says); names the file."""


def read_json(url: str) -> Any:
    try:
        return json.loads(read_bytes(url))
    except (ValueError, UnicodeDecodeError) as err:
        raise UnreadableFileError(f"{url} is not valid JSON ({err})") from None


def table_bytes(df: pd.DataFrame, schema: pa.Schema | None = None) -> bytes:
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_parquet_atomic(url: str, df: pd.DataFrame, schema: pa.Schema | None = None) -> None:
    write_bytes_atomic(url, table_bytes(df, schema))


def read_parquet(url: str) -> pd.DataFrame:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as fh:
        try:
            return pq.read_table(fh).to_pandas()
        except pa.ArrowException as err:
            raise UnreadableFileError(f"{url} is not a readable parquet file ({err}); if an EditForge stage wrote "
                                      "it, run that stage again to redo the partition") from None


def list_files(url: str, pattern: str = "*") -> list[str]:
    """Sorted full URLs of files matching `pattern` directly under `url` (empty if the folder is missing)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    found = sorted(fs.glob(f"{path.rstrip('/')}/{pattern}"))
    if isinstance(fs, LocalFileSystem):
        return found
    return [f"{protocol}://{p}" for p in found]


def listing(url: str) -> dict[str, dict[str, Any]]:
    """The files directly under ``url`` by name, each with ``size`` and ``mtime`` (unix seconds): one
    request per 1,000 entries on an object store, never cached; empty when the folder is missing."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path.rstrip("/"), detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = {}
    for e in entries:
        if e.get("type", "file") != "file":
            continue
        stamp = e.get("mtime") or e.get("LastModified") or e.get("updated") or 0
        found[e["name"].rstrip("/").rsplit("/", 1)[-1]] = {
            "size": int(e.get("size") or 0),
            "mtime": stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)}
    return found


def move(src: str, dst: str) -> None:
    """Move one file (same filesystem): a rename on local disk, copy + delete on object stores."""
    record = _WRITTEN.get()
    known = record.pop(src, None) if record is not None else None
    if record is not None:
        record.pop(dst, None)
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(dst_path) or ".", exist_ok=True)
        os.replace(src_path, dst_path)
    else:
        fs.mv(src_path, dst_path)
    if known is not None:
        record[dst] = known


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


TEMP_MARK = ".tmp-"  # write_bytes_atomic's temporary names: `<name>.tmp-<pid>-<8 hex>`


@contextmanager
def local_dir_atomic(final: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """A local folder built under a temporary name beside ``final`` (``.<name>.tmp-…``, yielded) and renamed
    into place when the block succeeds, readable like any output (mkdtemp's 0700 undone): it replaces
    ``final``, or with ``keep_existing`` leaves a ``final`` another process renamed there first. A block
    that fails leaves nothing behind and ``final`` as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_MARK}", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if final.exists() and not keep_existing:
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:  # keep_existing: another process won the race, keep theirs
            if not (keep_existing and final.exists()):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_temps(path: str) -> None:
    """Temporary files of earlier writes of ``path`` whose process is gone (killed mid-write)."""
    import glob

    for left in glob.glob(f"{glob.escape(path)}{TEMP_MARK}*"):
        pid = left.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
        if not pid.isdigit() or not pid_alive(int(pid)):
            try:
                os.remove(left)
            except FileNotFoundError:
                pass


def file_sizes(url: str) -> dict[str, int]:
    """Every file below ``url`` (recursively) by its path relative to ``url``, with its size in bytes."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return {}
    root = path.rstrip("/")
    found = fs.find(root, detail=True)
    return {name[len(root) + 1:]: int(info.get("size") or 0) for name, info in found.items()
            if info.get("type", "file") == "file"}


def sha256_of(url: str) -> str:
    return hashlib.sha256(read_bytes(url)).hexdigest()


def remove_temp_files(url: str) -> list[str]:
    """Delete the temporary files a killed atomic write left below ``url``; return their relative paths."""
    left = [name for name in file_sizes(url) if TEMP_MARK in name.rsplit("/", 1)[-1]]
    for name in left:
        remove(url_join(url, name))
    return left


def create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` at ``url`` only if nothing is there; False when the file already exists.

    Atomic on a local filesystem (``O_EXCL``). On object stores it uses the filesystem's exclusive
    mode (``xb``) where it has one, else an existence check before the write (a small race window).
    """
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    if fs.exists(path):
        return False
    try:
        with fs.open(path, "xb") as fh:
            fh.write(data)
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # no exclusive mode on this filesystem
        fs.pipe_file(path, data)
    return True
