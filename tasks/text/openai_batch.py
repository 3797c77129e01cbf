"""Batch API mode: the bulk run at half the price of online requests.

One partition becomes one batch job: a JSONL file with one request per caption (`custom_id` = the
caption id, the same request body as online mode), uploaded with purpose `batch`; the job is created,
polled until it ends, and its output file is downloaded and mapped back by `custom_id`. The job id is
recorded in the partition's progress folder as soon as it exists, so a re-run polls the same job
instead of paying for a second one. Requests that the job could not answer (listed in its error file,
or missing when it expired) are sent online, with the usual retries.
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
from tasks.text.format import FINISH_REJECTIONS, triplet_row
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


def batch_input_jsonl(t: TextConfig, model: str, captions: Sequence[Caption]) -> bytes:
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT_PATHS[t.openai.endpoint],
                         "body": request_body(t, model, cid, text)}, ensure_ascii=False) for cid, text in captions]
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


async def generate_batch(
    client: openai.AsyncOpenAI, t: TextConfig, model: str, captions: Sequence[Caption], writer: ChunkWriter,
    stats: Stats, rng: random.Random, state_url: str, partition_id: int, logger: logging.Logger = log,
) -> None:
    """Answer `captions` through one batch job (resumed when recorded in `state_url`), rows to `writer`."""
    o = t.openai
    retried = retrying(RetryPolicy.from_config(o), rng, stats)
    if not captions:
        return
    state = storage.read_json(state_url) if storage.exists(state_url) else None
    # the state lives under the config hash, so a recorded job asked the same questions; it can be
    # reused whenever it covers every caption still missing (a crash while writing its answers)
    if state and {cid for cid, _ in captions} <= set(state.get("custom_ids", [])):
        batch_id = state["batch_id"]
        logger.info("text part-%05d: resuming batch job %s", partition_id, batch_id)
        stats.add("batch_jobs_resumed")
    else:
        payload = batch_input_jsonl(t, model, captions)
        upload = await retried(lambda: client.files.create(
            file=(f"editforge-text-part-{partition_id:05d}.jsonl", io.BytesIO(payload)), purpose="batch"))
        batch = await retried(lambda: client.batches.create(
            input_file_id=upload.id, endpoint=ENDPOINT_PATHS[o.endpoint], completion_window="24h",
            metadata={"editforge_partition": str(partition_id)}))
        batch_id = batch.id
        storage.write_json_atomic(state_url, {"batch_id": batch_id, "input_file_id": upload.id,
                                              "custom_ids": sorted(cid for cid, _ in captions)})
        stats.add("batch_jobs_created")
        logger.info("text part-%05d: batch job %s created for %d requests", partition_id, batch_id, len(captions))

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
    for cid, text in captions:
        if cid in answers:
            answer = answers[cid]
            writer.add(triplet_row(cid, text, answer.text, model, t.max_edit_words,
                                   FINISH_REJECTIONS.get(answer.finish_reason)))
            if len(writer.rows) >= o.checkpoint_every:
                await writer.flush()
    await writer.flush()
    missing = [c for c in captions if c[0] not in answers]
    if missing:
        logger.info("text part-%05d: batch %s left %d requests unanswered (%s); sending them online",
                    partition_id, batch_id, len(missing), batch.status)
        stats.add("batch_fallback_online", len(missing))
        await generate_online(client, t, model, missing, writer, stats, rng, logger)
    storage.remove(state_url)


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
