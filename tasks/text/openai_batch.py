"""Batch API mode: the bulk run at half the price of online requests.

One partition becomes one batch job (one request per caption, ``custom_id`` = caption id), recorded in the
partition's progress folder as soon as it exists, so a re-run polls the same job instead of paying twice;
requests the job could not answer are sent online. With ``text.max_attempts`` > 1 each further try is one
more batch job with its own record.

In full: docs/text.md ("In the code").
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import openai

from tasks.common import storage
from tasks.common.config import TextConfig
from tasks.common.contract import Stats
from tasks.common.openai_batch import (  # noqa: F401  (BatchJobError, TERMINAL: re-exported)
    TERMINAL,
    BatchJobError,
    batch_lines,
    parse_batch_lines,
    run_batch_job,
)
from tasks.text.format import FINISH_REJECTIONS, rejections_so_far, triplet_row, wants_retry
from tasks.text.openai_api import (
    ENDPOINT_PATHS,
    Completion,
    RetryPolicy,
    completion_of,
    request_body,
    retrying,
)
from tasks.text.openai_generate import Caption, ChunkWriter, generate_online

log = logging.getLogger("editforge")


def batch_input_jsonl(t: TextConfig, model: str, captions: Sequence[Caption], attempt: int = 1) -> bytes:
    return batch_lines(
        [(cid, request_body(t, model, cid, text, attempt)) for cid, text in captions],
        ENDPOINT_PATHS[t.openai.endpoint],
    )


def parse_batch_output(endpoint: str, data: bytes) -> dict[str, Completion]:
    """custom_id -> generated text and finish reason for every request the job answered with HTTP 200."""
    return {cid: completion_of(endpoint, body) for cid, body in parse_batch_lines(data).items()}


def attempt_state_url(state_url: str, attempt: int) -> str:
    """Where try `attempt`'s batch job is recorded (`openai-batch.json` for the first try)."""
    return state_url if attempt == 1 else state_url.removesuffix(".json") + f"-attempt-{attempt}.json"


async def generate_batch(
    client: openai.AsyncOpenAI,
    t: TextConfig,
    model: str,
    captions: Sequence[Caption],
    writer: ChunkWriter,
    stats: Stats,
    rng: random.Random,
    state_url: str,
    partition_id: int,
    logger: logging.Logger = log,
) -> None:
    """Answer `captions` through one batch job per try (each resumed when recorded), rows to `writer`."""
    if not captions:
        return
    todo, earlier = list(captions), {}
    for attempt in range(1, t.max_attempts + 1):
        retry = await _one_try(
            client,
            t,
            model,
            todo,
            earlier,
            attempt,
            writer,
            stats,
            rng,
            attempt_state_url(state_url, attempt),
            partition_id,
            logger,
        )
        todo = [c for c in todo if c[0] in retry]
        earlier = retry
        if not todo:
            break
        stats.add("retried_captions", len(todo))
        logger.info(
            "text part-%05d: %d answers of try %d rejected; asking again (try %d of %d)",
            partition_id,
            len(todo),
            attempt,
            attempt + 1,
            t.max_attempts,
        )
    for attempt in range(1, t.max_attempts + 1):
        storage.remove(attempt_state_url(state_url, attempt))


async def _one_try(
    client: openai.AsyncOpenAI,
    t: TextConfig,
    model: str,
    captions: Sequence[Caption],
    earlier: dict[str, list[str]],
    attempt: int,
    writer: ChunkWriter,
    stats: Stats,
    rng: random.Random,
    state_url: str,
    partition_id: int,
    logger: logging.Logger,
) -> dict[str, list[str]]:
    """One batch job for try `attempt` of `captions`: final rows to `writer` (the unanswered ones go
    online and finish there); returns the captions to ask again, with their rejections so far."""
    o = t.openai
    retried = retrying(RetryPolicy.from_config(o), rng, stats)
    suffix = "" if attempt == 1 else f"-attempt-{attempt}"
    batch, bodies = await run_batch_job(
        client,
        retried,
        stats,
        state_url=state_url,
        custom_ids=[cid for cid, _ in captions],
        payload=lambda: batch_input_jsonl(t, model, captions, attempt),
        file_name=f"editforge-text-part-{partition_id:05d}{suffix}.jsonl",
        endpoint=ENDPOINT_PATHS[o.endpoint],
        metadata={"editforge_partition": str(partition_id), "editforge_attempt": str(attempt)},
        interval_s=o.poll_interval_s,
        timeout_s=o.poll_timeout_s,
        label=f"text part-{partition_id:05d}",
        note=f" (try {attempt})",
        logger=logger,
        state_extra={"attempt": attempt},
    )
    batch_id = batch.id
    answers = {cid: completion_of(o.endpoint, body) for cid, body in bodies.items()}
    stats.add("batch_answered", len(answers))
    rows = [
        triplet_row(
            cid,
            text,
            answers[cid].text,
            model,
            t.max_edit_words,
            FINISH_REJECTIONS.get(answers[cid].finish_reason),
            attempt=attempt,
            earlier=earlier.get(cid, []),
        )
        for cid, text in captions
        if cid in answers
    ]
    if o.moderation and attempt < t.max_attempts:  # a flagged answer is asked again
        await writer.moderate_rows([r for r in rows if r["status"] == "ok"])
    retry: dict[str, list[str]] = {}
    for row in rows:
        if wants_retry(row, t.max_attempts):
            retry[row["caption_id"]] = rejections_so_far(row)
            continue
        writer.add(row)
        if len(writer.rows) >= o.checkpoint_every:
            await writer.flush()
    await writer.flush()
    missing = [c for c in captions if c[0] not in answers]
    if missing:
        logger.info(
            "text part-%05d: batch %s left %d requests unanswered (%s); sending them online",
            partition_id,
            batch_id,
            len(missing),
            batch.status,
        )
        stats.add("batch_fallback_online", len(missing))
        await generate_online(
            client,
            t,
            model,
            missing,
            writer,
            stats,
            rng,
            logger,
            resume={cid: earlier.get(cid, []) for cid, _ in missing},
        )
    return retry
