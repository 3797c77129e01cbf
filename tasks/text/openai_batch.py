"""Batch API mode: the bulk run at half the price of online requests.

One partition becomes one batch job: a JSONL file with one request per caption (`custom_id` = the
caption id, the same request body as online mode), uploaded with purpose `batch`; the job is created,
polled until it ends, and its output file is downloaded and mapped back by `custom_id`. The job id is
recorded in the partition's progress folder as soon as it exists, so a re-run polls the same job
instead of paying for a second one. Requests that the job could not answer (listed in its error file,
or missing when it expired) are sent online, with the usual retries.

With `text.max_attempts` > 1, the captions whose answers are rejected for a reason another try can fix
go into one more batch job per try (seeds of that try), until accepted or out of tries; while tries are
left, accepted answers are moderated before they are written, so a flagged one is asked again. Each
try's job id has its own record (`openai-batch.json`, `openai-batch-attempt-2.json`, ...), all kept
until the partition's last try is written: a re-run after a crash re-reads the answers of the finished
jobs (the rows it still needs are exactly those that went on to a later try) and polls the running one.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Sequence
from typing import Any

import openai

from tasks.common import storage
from tasks.common.config import TextConfig
from tasks.common.contract import Stats
from tasks.common.errors import PermanentError
from tasks.text.format import FINISH_REJECTIONS, rejections_so_far, triplet_row, wants_retry
from tasks.text.openai_api import (
    ENDPOINT_PATHS,
    Completion,
    RetryPolicy,
    completion_of,
    poll_until,
    request_body,
    retrying,
)
from tasks.text.openai_generate import Caption, ChunkWriter, generate_online

log = logging.getLogger("editforge")
TERMINAL = {"completed", "failed", "expired", "cancelled"}


class BatchJobError(PermanentError, RuntimeError):
    """The batch job failed as a whole (e.g. its input file did not validate); the message has its errors."""


def batch_input_jsonl(t: TextConfig, model: str, captions: Sequence[Caption], attempt: int = 1) -> bytes:
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT_PATHS[t.openai.endpoint],
                         "body": request_body(t, model, cid, text, attempt)}, ensure_ascii=False)
             for cid, text in captions]
    return ("\n".join(lines) + "\n").encode("utf-8")


def parse_batch_output(endpoint: str, data: bytes) -> dict[str, Completion]:
    """custom_id -> generated text and finish reason for every request the job answered with HTTP 200."""
    answers: dict[str, Completion] = {}
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        response = item.get("response") or {}
        if response.get("status_code") == 200 and not item.get("error"):
            answers[item["custom_id"]] = completion_of(endpoint, response.get("body") or {})
    return answers


def attempt_state_url(state_url: str, attempt: int) -> str:
    """Where try `attempt`'s batch job is recorded (`openai-batch.json` for the first try)."""
    return state_url if attempt == 1 else state_url.removesuffix(".json") + f"-attempt-{attempt}.json"


async def generate_batch(
    client: openai.AsyncOpenAI, t: TextConfig, model: str, captions: Sequence[Caption], writer: ChunkWriter,
    stats: Stats, rng: random.Random, state_url: str, partition_id: int, logger: logging.Logger = log,
) -> None:
    """Answer `captions` through one batch job per try (each resumed when recorded), rows to `writer`."""
    if not captions:
        return
    todo, earlier = list(captions), {}
    for attempt in range(1, t.max_attempts + 1):
        retry = await _one_try(client, t, model, todo, earlier, attempt, writer, stats, rng,
                               attempt_state_url(state_url, attempt), partition_id, logger)
        todo = [c for c in todo if c[0] in retry]
        earlier = retry
        if not todo:
            break
        stats.add("retried_captions", len(todo))
        logger.info("text part-%05d: %d answers of try %d rejected; asking again (try %d of %d)", partition_id,
                    len(todo), attempt, attempt + 1, t.max_attempts)
    for attempt in range(1, t.max_attempts + 1):
        storage.remove(attempt_state_url(state_url, attempt))


async def _one_try(
    client: openai.AsyncOpenAI, t: TextConfig, model: str, captions: Sequence[Caption], earlier: dict[str, list[str]],
    attempt: int, writer: ChunkWriter, stats: Stats, rng: random.Random, state_url: str, partition_id: int,
    logger: logging.Logger,
) -> dict[str, list[str]]:
    """One batch job for try `attempt` of `captions`: final rows to `writer` (the unanswered ones go
    online and finish there); returns the captions to ask again, with their rejections so far."""
    o = t.openai
    retried = retrying(RetryPolicy.from_config(o), rng, stats)
    state = storage.read_json(state_url) if storage.exists(state_url) else None
    # the state lives under the config hash, so a recorded job asked the same questions; it can be
    # reused whenever it covers every caption still missing (a crash while writing its answers)
    if state and {cid for cid, _ in captions} <= set(state.get("custom_ids", [])):
        batch_id = state["batch_id"]
        logger.info("text part-%05d: resuming batch job %s", partition_id, batch_id)
        stats.add("batch_jobs_resumed")
    else:
        payload = batch_input_jsonl(t, model, captions, attempt)
        suffix = "" if attempt == 1 else f"-attempt-{attempt}"
        upload = await retried(lambda: client.files.create(
            file=(f"editforge-text-part-{partition_id:05d}{suffix}.jsonl", io.BytesIO(payload)), purpose="batch"))
        batch = await retried(lambda: client.batches.create(
            input_file_id=upload.id, endpoint=ENDPOINT_PATHS[o.endpoint], completion_window="24h",
            metadata={"editforge_partition": str(partition_id), "editforge_attempt": str(attempt)}))
        batch_id = batch.id
        storage.write_json_atomic(state_url, {"batch_id": batch_id, "input_file_id": upload.id, "attempt": attempt,
                                              "custom_ids": sorted(cid for cid, _ in captions)})
        stats.add("batch_jobs_created")
        logger.info("text part-%05d: batch job %s created for %d requests (try %d)", partition_id, batch_id,
                    len(captions), attempt)

    batch = await _poll(client, retried, batch_id, o.poll_interval_s, o.poll_timeout_s, partition_id, logger)
    if batch.status == "failed":
        storage.remove(state_url)
        errors = [f"{e.code}: {e.message}" for e in (getattr(batch.errors, "data", None) or [])]
        raise BatchJobError(f"batch job {batch_id} failed: {'; '.join(errors) or 'no error given'}")
    answers: dict[str, Completion] = {}
    if batch.output_file_id:
        content = await retried(lambda: client.files.content(batch.output_file_id))
        answers = parse_batch_output(o.endpoint, content.read())
    stats.add("batch_answered", len(answers))
    rows = [triplet_row(cid, text, answers[cid].text, model, t.max_edit_words,
                        FINISH_REJECTIONS.get(answers[cid].finish_reason), attempt=attempt,
                        earlier=earlier.get(cid, []))
            for cid, text in captions if cid in answers]
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
        logger.info("text part-%05d: batch %s left %d requests unanswered (%s); sending them online",
                    partition_id, batch_id, len(missing), batch.status)
        stats.add("batch_fallback_online", len(missing))
        await generate_online(client, t, model, missing, writer, stats, rng, logger,
                              resume={cid: earlier.get(cid, []) for cid, _ in missing})
    return retry


async def _poll(client: openai.AsyncOpenAI, retried, batch_id: str, interval: float, timeout: float,
                partition_id: int, logger: logging.Logger) -> Any:
    """Poll the batch job until it ends, logging its status and request counts whenever they change."""
    last = None

    async def report(batch: Any) -> None:
        nonlocal last
        counts = batch.request_counts
        progress = (batch.status, counts.completed if counts else None, counts.failed if counts else None)
        if progress != last:
            logger.info("text part-%05d: batch %s %s (%s done, %s failed of %s)", partition_id, batch_id,
                        batch.status, *progress[1:], counts.total if counts else "?")
            last = progress

    return await poll_until(lambda: retried(lambda: client.batches.retrieve(batch_id)),
                            lambda batch: batch.status in TERMINAL, report, interval, timeout,
                            f"batch job {batch_id}")
