"""The Batch API as every OpenAI-compatible client uses it (the text backend, the VLM judge): one job from a
JSONL payload, recorded as soon as it exists so a re-run polls it instead of paying for another, polled
until it ends, its output file read back by ``custom_id``.

:func:`run_batch_job` reuses the job recorded at ``state_url`` when it covers every request still wanted
(a crash while its answers were being written), else uploads the payload (purpose ``batch``), creates the
job and records ``{"batch_id", "input_file_id", "custom_ids", ...}`` before polling. A failed job removes
its record and raises :class:`BatchJobError` with the job's errors; requests it left unanswered (its
error file, or missing when it expired) are the caller's to send online.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import openai

from tasks.common import storage
from tasks.common.contract import Stats
from tasks.common.errors import PermanentError
from tasks.common.openai_client import poll_until

log = logging.getLogger("editforge")
TERMINAL = {"completed", "failed", "expired", "cancelled"}
Retried = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]


class BatchJobError(PermanentError, RuntimeError):
    """The batch job failed as a whole (e.g. its input file did not validate); the message has its errors."""


def batch_lines(requests: Sequence[tuple[str, dict[str, Any]]], url: str) -> bytes:
    """The JSONL input of a batch job: one ``{"custom_id", "method", "url", "body"}`` line per request."""
    lines = [
        json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}, ensure_ascii=False)
        for cid, body in requests
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def parse_batch_lines(data: bytes) -> dict[str, dict[str, Any]]:
    """custom_id -> response body for every request the job answered with HTTP 200."""
    answers: dict[str, dict[str, Any]] = {}
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        response = item.get("response") or {}
        if response.get("status_code") == 200 and not item.get("error"):
            answers[item["custom_id"]] = response.get("body") or {}
    return answers


async def run_batch_job(
    client: openai.AsyncOpenAI,
    retried: Retried,
    stats: Stats,
    *,
    state_url: str,
    custom_ids: Sequence[str],
    payload: Callable[[], bytes],
    file_name: str,
    endpoint: str,
    metadata: dict[str, str],
    interval_s: float,
    timeout_s: float,
    label: str,
    note: str = "",
    logger: logging.Logger = log,
    state_extra: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """One batch job for ``custom_ids`` (created from ``payload()``, or the recorded one resumed); returns
    the finished job and its answers (custom_id -> response body). ``label`` names the partition in logs
    (``text part-00003``), ``note`` is added to the creation line."""
    state = storage.read_json(state_url) if storage.exists(state_url) else None
    # the state lives under the config hash, so a recorded job asked the same questions; it can be
    # reused whenever it covers every request still missing (a crash while writing its answers)
    if state and set(custom_ids) <= set(state.get("custom_ids", [])):
        batch_id = state["batch_id"]
        logger.info("%s: resuming batch job %s", label, batch_id)
        stats.add("batch_jobs_resumed")
    else:
        data = payload()
        upload = await retried(
            lambda: client.files.create(file=(file_name, io.BytesIO(data)), purpose="batch")
        )
        batch = await retried(
            lambda: client.batches.create(
                input_file_id=upload.id, endpoint=endpoint, completion_window="24h", metadata=metadata
            )
        )
        batch_id = batch.id
        storage.write_json_atomic(
            state_url,
            {
                "batch_id": batch_id,
                "input_file_id": upload.id,
                **(state_extra or {}),
                "custom_ids": sorted(custom_ids),
            },
        )
        stats.add("batch_jobs_created")
        logger.info("%s: batch job %s created for %d requests%s", label, batch_id, len(custom_ids), note)

    batch = await poll_batch(client, retried, batch_id, interval_s, timeout_s, label, logger)
    if batch.status == "failed":
        storage.remove(state_url)
        errors = [f"{e.code}: {e.message}" for e in (getattr(batch.errors, "data", None) or [])]
        raise BatchJobError(f"batch job {batch_id} failed: {'; '.join(errors) or 'no error given'}")
    answers: dict[str, dict[str, Any]] = {}
    if batch.output_file_id:
        content = await retried(lambda: client.files.content(batch.output_file_id))
        answers = parse_batch_lines(content.read())
    return batch, answers


async def poll_batch(
    client: openai.AsyncOpenAI,
    retried: Retried,
    batch_id: str,
    interval: float,
    timeout: float,
    label: str,
    logger: logging.Logger = log,
) -> Any:
    """Poll the batch job until it ends, logging its status and request counts whenever they change."""
    last = None

    async def report(batch: Any) -> None:
        nonlocal last
        counts = batch.request_counts
        progress = (batch.status, counts.completed if counts else None, counts.failed if counts else None)
        if progress != last:
            logger.info(
                "%s: batch %s %s (%s done, %s failed of %s)",
                label,
                batch_id,
                batch.status,
                *progress[1:],
                counts.total if counts else "?",
            )
            last = progress

    return await poll_until(
        lambda: retried(lambda: client.batches.retrieve(batch_id)),
        lambda batch: batch.status in TERMINAL,
        report,
        interval,
        timeout,
        f"batch job {batch_id}",
    )
