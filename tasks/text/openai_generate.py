"""Online generation against an OpenAI-compatible API: many requests in flight, results checkpointed.

``concurrency`` requests (default 64) are in flight through :mod:`tasks.common.openai_pool`, each caption
one request with its own seed, retried on 429/5xx/timeouts; answers are validated as they arrive and
checkpointed in chunks, so a re-run never asks an answered caption again and the rows do not depend on
arrival order. Moderation and retries per caption (``text.max_attempts``) as the reference did.

Checkpointing, moderation and retries in full: docs/text.md ("In the code").
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import openai

from tasks.common.config import TextConfig
from tasks.common.contract import Checkpoint, Stats
from tasks.common.openai_pool import ChunkBuffer, serve
from tasks.text.format import (
    FINISH_REJECTIONS,
    REJECT_API,
    REJECT_MODERATION,
    TRIPLET_COLUMNS,
    rejections_so_far,
    triplet_row,
    wants_retry,
)
from tasks.text.openai_api import RetryPolicy, create_completion, moderate, request_body, retrying

log = logging.getLogger("editforge")
Caption = tuple[str, str]  # (caption_id, text)
MODERATED = "_moderated"  # a row key (not a column): its generated text was already moderated


class ChunkWriter(ChunkBuffer):
    """Buffers finished rows; moderates their generated text and appends them as one checkpoint chunk."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        t: TextConfig,
        checkpoint: Checkpoint,
        stats: Stats,
        rng: random.Random,
        on_chunk: Callable[[int], None] | None = None,
    ):
        o = t.openai
        super().__init__(
            checkpoint,
            stats,
            TRIPLET_COLUMNS,
            "caption_id",
            o.checkpoint_every,
            o.checkpoint_interval_s,
            on_chunk,
        )
        self.client, self.t, self.rng = client, t, rng
        self._moderate_output = True

    async def flush(self, moderate_output: bool = True) -> None:
        self._moderate_output = moderate_output
        try:
            await super().flush()
        finally:
            self._moderate_output = True

    async def prepare(self, rows: list[dict]) -> None:
        if self._moderate_output and self.t.openai.moderation:
            await self.moderate_rows([r for r in rows if not r.get(MODERATED)])

    async def moderate_rows(self, rows: list[dict]) -> None:
        """Moderate the generated text of the accepted rows (groups of `moderation_batch`); a flagged
        row is rejected with `moderation_flag`. Every row given is marked as moderated."""
        o = self.t.openai
        for row in rows:
            row[MODERATED] = True
        kept = [r for r in rows if r["status"] == "ok"]
        retried = retrying(RetryPolicy.from_config(o), self.rng, self.stats)
        for i in range(0, len(kept), o.moderation_batch):
            group = kept[i : i + o.moderation_batch]
            texts = [f"{r['edit']}\n{r['output']}" for r in group]
            flags = await retried(partial(moderate, self.client, o.moderation_model, texts))
            self.stats.add("moderation_requests")
            for row, flagged in zip(group, flags):
                if flagged:
                    row["status"], row["reject_reason"] = "rejected", REJECT_MODERATION


async def moderate_captions(
    client: openai.AsyncOpenAI, t: TextConfig, captions: Sequence[Caption], stats: Stats, rng: random.Random
) -> set[str]:
    """Caption ids whose caption the moderation endpoint flags (groups of `moderation_batch`, concurrently)."""
    o = t.openai
    retried = retrying(RetryPolicy.from_config(o), rng, stats)
    limit = asyncio.Semaphore(o.concurrency)
    flagged: set[str] = set()

    async def one(group: Sequence[Caption]) -> None:
        async with limit:
            flags = await retried(lambda: moderate(client, o.moderation_model, [c for _, c in group]))
        stats.add("moderation_requests")
        flagged.update(cid for (cid, _), f in zip(group, flags) if f)

    groups = [captions[i : i + o.moderation_batch] for i in range(0, len(captions), o.moderation_batch)]
    await asyncio.gather(*(one(g) for g in groups))
    return flagged


async def generate_online(
    client: openai.AsyncOpenAI,
    t: TextConfig,
    model: str,
    captions: Sequence[Caption],
    writer: ChunkWriter,
    stats: Stats,
    rng: random.Random,
    logger: logging.Logger = log,
    resume: Mapping[str, list[str]] | None = None,
) -> None:
    """Generate one triplet per caption with `concurrency` requests in flight; rows go to `writer`.

    Each caption gets up to `max_attempts` tries (see module doc); `resume` maps a caption to the
    rejection reasons of tries already made elsewhere (the Batch API), so it goes on from the next one.
    A request refused for good (4xx other than 408/409/429) gives a row rejected as `api_error`; a
    retryable error that outlives `max_retries` stops the run (after flushing what was answered) so
    Prefect's task retry, or a re-run, resumes it.
    """
    o = t.openai
    retried = retrying(RetryPolicy.from_config(o), rng, stats)

    async def ask(caption_id: str, caption: str, attempt: int, earlier: list[str]) -> dict:
        body = request_body(t, model, caption_id, caption, attempt)
        reason = raw = None
        try:
            answer = await retried(partial(create_completion, client, o.endpoint, body, o.request_timeout_s))
            stats.add("requests_answered")
            raw, reason = answer.text, FINISH_REJECTIONS.get(answer.finish_reason)
        except openai.APIStatusError as err:
            if err.status_code >= 500 or err.status_code in (408, 409, 429):
                raise
            logger.warning(
                "text: request for caption %s refused (HTTP %s): %s",
                caption_id,
                err.status_code,
                str(err)[:300],
            )
            reason = REJECT_API
        return triplet_row(
            caption_id, caption, raw, model, t.max_edit_words, reason, attempt=attempt, earlier=earlier
        )

    async def handle(item: Caption) -> list[dict]:
        caption_id, caption = item
        earlier = list((resume or {}).get(caption_id, []))
        while True:
            row = await ask(caption_id, caption, len(earlier) + 1, earlier)
            if row["status"] == "ok" and o.moderation and row["attempt"] < t.max_attempts:
                await writer.moderate_rows([row])  # a flagged answer is asked again
            if not wants_retry(row, t.max_attempts):
                return [row]
            stats.add("retried_captions")
            earlier = rejections_so_far(row)

    await serve(captions, handle, o.concurrency, writer, logger, "text")


def moderation_rows(t: TextConfig, captions: Sequence[Caption], flagged: set[str], model: str) -> list[dict]:
    """Rejected rows for captions flagged by moderation (no generation request is sent for them)."""
    return [
        triplet_row(cid, text, None, model, t.max_edit_words, REJECT_MODERATION, attempt=0)
        for cid, text in captions
        if cid in flagged
    ]
