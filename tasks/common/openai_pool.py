"""Many requests in flight, answers checkpointed as they arrive: the engine of every OpenAI-compatible client
(the text backend's online generation, the VLM judge).

:func:`serve` runs up to ``concurrency`` workers over a list of items; each worker handles one item at a
time (its requests, retries and parsing are the caller's ``handle``) and adds the finished rows to a
:class:`ChunkBuffer`, which appends them to the partition's checkpoint in chunks (every
``checkpoint_every`` rows or ``checkpoint_interval_s`` seconds, a ticker flushing the slow ones). When the
run stops on an error or is cancelled, the rows already finished are flushed before it ends, so only a
hard kill loses answers, and then at most one unflushed chunk plus the requests in flight; a re-run skips
every key in the checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import pandas as pd

from tasks.common.contract import Checkpoint, Stats

log = logging.getLogger("editforge")
Item = TypeVar("Item")


class ChunkBuffer:
    """Buffers finished rows and appends them to ``checkpoint`` as one chunk (named by its sorted keys).

    Subclasses may override :meth:`prepare` (awaited on a chunk's rows before it is written: the text
    backend moderates there)."""

    def __init__(self, checkpoint: Checkpoint, stats: Stats, columns: Sequence[str], key: str, every: int,
                 interval_s: float, on_chunk: Callable[[int], None] | None = None):
        self.checkpoint, self.stats, self.columns, self.key = checkpoint, stats, list(columns), key
        self.every, self.interval_s, self.on_chunk = every, interval_s, on_chunk
        self.rows: list[dict] = []
        self.oldest: float | None = None
        self.chunks_written = 0

    def add(self, row: dict) -> None:
        if not self.rows:
            self.oldest = time.monotonic()
        self.rows.append(row)

    def due(self) -> bool:
        return len(self.rows) >= self.every or (
            bool(self.rows) and self.oldest is not None and time.monotonic() - self.oldest >= self.interval_s)

    async def prepare(self, rows: list[dict]) -> None:
        """Work on a chunk's rows before it is written (nothing by default)."""

    async def flush(self) -> None:
        rows, self.rows, self.oldest = self.rows, [], None
        if not rows:
            return
        await self.prepare(rows)
        ids = sorted(str(r[self.key]) for r in rows)
        chunk_id = hashlib.sha1("\n".join(ids).encode()).hexdigest()
        self.checkpoint.append(chunk_id, pd.DataFrame(rows, columns=self.columns))
        self.chunks_written += 1
        self.stats.add("checkpoint_chunks")
        if self.on_chunk:
            self.on_chunk(self.chunks_written)


async def serve(items: Sequence[Item], handle: Callable[[Item], Awaitable[Iterable[dict[str, Any]]]],
                concurrency: int, writer: ChunkBuffer, logger: logging.Logger = log, label: str = "text") -> None:
    """Handle every item with ``concurrency`` workers; each handled item's rows go to ``writer``.

    A failure in a worker or in the ticker's flush stops them all at once; the rows already finished are
    flushed (see module doc) and the error is raised, so Prefect's task retry, or a re-run, resumes.
    """
    queue: asyncio.Queue[Item] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    # set when the run stops: no worker takes another item. Cancelling is not enough: Python 3.11's
    # asyncio.wait_for returns the answer and drops a cancellation that arrives with it, so a worker could
    # go on to drain the whole queue after a failure (seen: a crashed partition finished in full)
    stopping = asyncio.Event()

    async def worker() -> None:
        while not stopping.is_set():
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            for row in await handle(item):
                writer.add(row)
            if writer.due():
                await writer.flush()

    stop = asyncio.Event()

    async def ticker() -> None:
        # stopped by `stop`, never cancelled: a flush it has begun owns rows no one else holds (cancelling
        # it mid-moderation lost them, and the partition was marked done without them)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), max(0.05, writer.interval_s / 2))
            except TimeoutError:
                pass
            if not stop.is_set() and writer.due():
                await writer.flush()

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(items)))]
    tick = asyncio.create_task(ticker())
    try:
        # until every worker is done; a failure in a worker or in the ticker's flush stops them all at once
        remaining = set(workers)
        while remaining:
            done, _ = await asyncio.wait(remaining | {tick}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                remaining.discard(task)
                if task is tick or (not task.cancelled() and task.exception() is not None):
                    raise (None if task.cancelled() else task.exception()) or RuntimeError("the checkpoint ticker stopped")
    except BaseException:
        stopping.set()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        stop.set()
        await asyncio.gather(tick, return_exceptions=True)
        await final_flush(writer, logger, label)
        raise
    stop.set()
    (ticked,) = await asyncio.gather(tick, return_exceptions=True)
    if isinstance(ticked, BaseException):  # its rows were not written: the run must not end as done
        await final_flush(writer, logger, label)
        raise ticked
    await writer.flush()  # on success a failed write fails the run (never a partition done without rows)


async def final_flush(writer: ChunkBuffer, logger: logging.Logger, label: str = "text") -> None:
    """Write the rows still buffered (also when the run is failing or cancelled)."""
    if not writer.rows:
        return
    try:
        await asyncio.shield(writer.flush())
    except Exception as err:  # noqa: BLE001  (the run is already failing; these answers are requested again)
        logger.warning("%s: could not checkpoint %d buffered answers (%s); they will be requested again",
                       label, len(writer.rows), type(err).__name__)
