"""Storage through fsspec: local paths, file://, s3://, gs://, memory:// all work the same way.

Writes are atomic: on a local filesystem the bytes go to a temporary name in the same folder and are
renamed into place; on object stores a single PUT is already all-or-nothing. A reader therefore sees
either the whole file or no file — never a partial one.

A write that cannot succeed on a retry (disk full, read-only file system, permission denied, a file
where a folder should be, a bucket that does not exist) raises :class:`WriteError`, a permanent error
whose message names the path and what to do; :func:`output_root_problem` and :func:`check_output_root`
find the same problems of a run's ``output_root`` before anything is written.
"""

from __future__ import annotations

import errno
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

from tasks.common.errors import PermanentError

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


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    record = _WRITTEN.get()
    if record is not None:
        record.pop(url, None)  # a failed write must not leave an old hash behind
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.makedirs(parent or ".", exist_ok=True)
            _remove_dead_temps(path)
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        except OSError as err:
            raise write_error(url, err) from None
    else:
        try:
            if parent and not _bucket_store(url):  # a bucket store has no folders; makedirs would create the bucket
                fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(path, data)
        except OSError as err:
            raise write_error(url, err) from None
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
    try:
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
    except OSError as err:
        raise write_error(url, err) from None


class WriteError(PermanentError, OSError):
    """A write a retry cannot fix (see the module doc); ``str()`` is the message naming the path."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class OutputRootError(PermanentError, ValueError):
    """The run's ``output_root`` cannot be used as it is (the message names it and what to do)."""


# errors of a write that a retry meets again, with what a person does about them
_WRITE_FIXES = {
    errno.ENOSPC: "no space left on the device (disk full): free space there or point output_root at a disk with "
                  "room; finished partitions are kept and a re-run resumes",
    errno.EDQUOT: "disk quota exceeded: free space there or point output_root at a disk with room; finished "
                  "partitions are kept and a re-run resumes",
    errno.EROFS: "read-only file system: point output_root at a writable folder",
    errno.EACCES: "permission denied: make the folder writable for this user or point output_root elsewhere",
    errno.EPERM: "operation not permitted: make the folder writable for this user or point output_root elsewhere",
    errno.ENOTDIR: "a file is in the way where a folder should be: point output_root at a folder",
    errno.EEXIST: "a file is in the way where a folder should be: point output_root at a folder",
    errno.EISDIR: "a folder is in the way where a file should be: remove it or point output_root elsewhere",
    errno.ENAMETOOLONG: "the path is too long for the file system: use a shorter output_root",
    errno.EFBIG: "the file is larger than the file system (or this process's limit) allows",
}


BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs")


def _bucket_store(url: str) -> bool:
    return url.split("://", 1)[0] in BUCKET_PROTOCOLS if "://" in url else False


def _bucket(url: str) -> str | None:
    if "://" not in url:
        return None
    return url.split("://", 1)[1].split("/", 1)[0] or None


def write_error(url: str, err: BaseException) -> BaseException:
    """``err`` (raised writing ``url``) as :class:`WriteError` when a retry cannot fix it, else unchanged."""
    code = getattr(err, "errno", None)
    text = str(err)
    if "://" in url and ("NoSuchBucket" in text or "bucket does not exist" in text.lower()):
        bucket = _bucket(url)
        return WriteError(f"cannot write {url}: the bucket {bucket!r} does not exist: create it, or set output_root "
                          "to a bucket this process can write to", code)
    if code in _WRITE_FIXES:
        where = getattr(err, "filename", None) or url
        return WriteError(f"cannot write {url}: {_WRITE_FIXES[code]}"
                          + (f" (at {where})" if str(where) != url else ""), code)
    if isinstance(err, PermissionError):  # an object store refusing the credentials
        return WriteError(f"cannot write {url}: access denied ({text[:200]}): check the credentials, or set "
                          "output_root to a place this process can write to", code)
    return err


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (lstat errors other than 'missing' propagate)."""
    for candidate in (path, *path.parents):
        try:
            candidate.lstat()
            return candidate
        except FileNotFoundError:
            continue
        except NotADirectoryError:  # an ancestor is a file: find it
            continue
    return Path(path.anchor or ".")


def _local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if "://" in url else Path(url)


def output_root_problem(url: str) -> str | None:
    """What makes ``url`` unusable as a run's ``output_root`` without touching the network or writing
    anything (None when nothing does): empty, a NUL, an unknown protocol, no bucket, a file where the
    folder (or one of its parents) should be."""
    if not url.strip():
        return ("output_root is empty: set it to a folder or an object-store URL (e.g. --set output_root=runs/demo "
                "or s3://bucket/run)")
    if "\0" in url:
        return "output_root contains a NUL character"
    local = _local_path(url)
    if local is None:
        protocol = url.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError) as err:
            return f"output_root {url!r}: {err}"
        if protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss") and not _bucket(url):
            return f"output_root {url!r}: no bucket: expected {protocol}://bucket/prefix"
        return None
    try:
        found = _nearest_existing(local.absolute())
        if not found.is_dir():
            where = "is a file" if found == local.absolute() else f"is under {found}, which is a file"
            return f"output_root {url} {where}, not a folder: point output_root at a folder (a new one is created)"
    except OSError as err:
        return f"output_root {url}: {err.strerror or err}"
    return None


def check_output_root(url: str, *, write: bool) -> None:
    """Raise :class:`OutputRootError` when ``url`` cannot be this command's ``output_root``: with ``write``,
    when it (or the folder it would be created in) is not writable, or its bucket does not exist; without,
    when nothing is there (a command that reads a run). Object stores are asked over the network."""
    if problem := output_root_problem(url):
        raise OutputRootError(problem)
    local = _local_path(url)
    if local is not None:
        if not write:
            if not local.is_dir():
                raise OutputRootError(f"no run at output_root {url}: nothing has been written there (check --preset "
                                      "and --set output_root, or start the run with editforge run)")
            return
        found = _nearest_existing(local.absolute())
        if not os.access(found, os.W_OK | os.X_OK):
            readonly = bool(os.statvfs(found).f_flag & os.ST_RDONLY)
            why = "is on a read-only file system" if readonly else "is not writable by this user"
            where = "" if found == local.absolute() else f" (the folder it would be created in, {found})"
            raise OutputRootError(f"output_root {url}{where} {why}: point output_root at a writable folder "
                                  f"(--set output_root=...)")
        return
    fs, path = filesystem(url)
    bucket = _bucket(url)
    try:
        if bucket and _bucket_store(url) and not fs.exists(bucket):
            raise OutputRootError(f"output_root {url}: the bucket {bucket!r} does not exist (or this process may not "
                                  "see it): create it, or set output_root to a bucket you can write to")
        if not write and not fs.exists(path):
            raise OutputRootError(f"no run at output_root {url}: nothing has been written there (check --preset and "
                                  "--set output_root, or start the run with editforge run)")
    except PermissionError as err:
        raise OutputRootError(f"output_root {url}: access denied ({str(err)[:200]}): check the credentials") from None
