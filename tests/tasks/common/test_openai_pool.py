"""The request pool stops taking work when the run stops, even where a worker's cancellation is lost."""

from __future__ import annotations

import asyncio

import pytest

from tasks.common.contract import Checkpoint, Stats
from tasks.common.openai_pool import ChunkBuffer, serve


class Boom(RuntimeError):
    pass


def test_a_failure_stops_every_worker_even_one_whose_cancellation_was_swallowed(tmp_path):
    """Python 3.11's `asyncio.wait_for` returns an answer that arrives with a cancellation and drops the
    cancellation; a worker in that race used to go on through the whole queue after the run failed."""
    handled: list[int] = []
    waiting = asyncio.Event()

    async def handle(item: int) -> list[dict]:
        handled.append(item)
        if item == 0:
            await waiting.wait()  # item 1 is in flight before the failure
            raise Boom("the first item fails")
        if item == 1:
            waiting.set()
            try:
                await asyncio.Event().wait()  # never answered ...
            except asyncio.CancelledError:
                pass  # ... but the cancellation is swallowed, as wait_for's race does, and the answer returned
        return [{"key": str(item)}]

    checkpoint = Checkpoint(str(tmp_path / "progress"), "key")
    writer = ChunkBuffer(checkpoint, Stats(), ["key"], "key", every=100, interval_s=3600)
    with pytest.raises(Boom):
        asyncio.run(serve(list(range(20)), handle, 2, writer))
    assert sorted(handled) == [0, 1]  # nothing taken after the failure
    assert checkpoint.load()["key"].tolist() == ["1"]  # the answer in hand is kept (flushed on the way out)
