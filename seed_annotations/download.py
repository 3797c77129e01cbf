"""Download the paper's 700 human-written triplets (``human-written-prompts.jsonl``).

The file is written atomically (a temporary file beside the destination, validated, then
``os.replace``), so an interrupted or rejected download never leaves a partial file at ``dest``.

Usage: ``python -m seed_annotations.download DEST [--url URL] [--timeout SECONDS]``
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from seed_annotations.schema import SeedAnnotationError, load_triplets

__all__ = ["PAPER_PROMPTS_URL", "PromptDownloadError", "download_paper_prompts", "main"]

PAPER_PROMPTS_URL = "http://instruct-pix2pix.eecs.berkeley.edu/human-written-prompts.jsonl"
_CHUNK_BYTES = 1 << 16


class PromptDownloadError(RuntimeError):
    """The prompts file could not be fetched (network unreachable, HTTP error, timeout)."""


def _target_path(dest: str | os.PathLike[str], url: str) -> Path:
    """``dest`` itself, or ``dest/<file name of the URL>`` when ``dest`` is an existing directory."""
    path = Path(dest)
    if path.is_dir():
        name = url.rstrip("/").rsplit("/", 1)[-1] or "human-written-prompts.jsonl"
        path = path / name
    return path


def _fetch_to(url: str, handle: IO[bytes], timeout: float) -> None:
    hint = "download it on a machine with network access and pass its path instead"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK_BYTES):
                handle.write(chunk)
    except urllib.error.HTTPError as exc:
        raise PromptDownloadError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise PromptDownloadError(f"connecting to {url} timed out after {timeout:g} s; {hint}") from exc
        raise PromptDownloadError(f"cannot reach {url} ({exc.reason}); {hint}") from exc
    except TimeoutError as exc:
        raise PromptDownloadError(f"downloading {url} timed out after {timeout:g} s; {hint}") from exc
    except (http.client.HTTPException, ConnectionError) as exc:
        raise PromptDownloadError(f"downloading {url} was interrupted: {exc!r}") from exc


def download_paper_prompts(
    dest: str | os.PathLike[str], url: str = PAPER_PROMPTS_URL, timeout: float = 60
) -> tuple[Path, int]:
    """Fetch the paper's triplets to ``dest``, validate them, and return ``(path, count)``.

    Raises :class:`PromptDownloadError` when the server cannot be reached or answers with an error,
    and :class:`~seed_annotations.schema.SeedAnnotationError` (naming the URL, line and field) when
    the content is not a valid triplet file. On any failure ``dest`` is left untouched.
    Unknown extra keys in the released file are ignored.
    """
    target = _target_path(dest, url)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp_path: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(
            mode="wb", dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False
        ) as handle:
            temp_path = Path(handle.name)
            _fetch_to(url, handle, timeout)
            handle.flush()
            os.fsync(handle.fileno())
        count = len(load_triplets(temp_path, strict=False, source=url))
        temp_path.chmod(0o644)  # NamedTemporaryFile creates 0600; the result is an ordinary data file
        os.replace(temp_path, target)
    except BaseException:
        if temp_path is not None:
            temp_path.unlink(missing_ok=True)
        raise
    return target, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seed_annotations.download",
        description="Download and validate the InstructPix2Pix paper's human-written triplets.",
    )
    parser.add_argument("dest", help="file to write, or an existing directory to write into")
    parser.add_argument("--url", default=PAPER_PROMPTS_URL, help="source URL (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60, help="network timeout in seconds")
    args = parser.parse_args(argv)
    try:
        path, count = download_paper_prompts(args.dest, url=args.url, timeout=args.timeout)
    except (PromptDownloadError, SeedAnnotationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {count} triplets to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
