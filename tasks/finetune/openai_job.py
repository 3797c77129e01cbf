"""Fine-tuning through the OpenAI fine-tuning API (or any server that implements it).

Upload the files, create the job and record its id at once, poll it until it ends, return the fine-tuned
model id (or raise ``FineTuneJobError``). A re-run polls a recorded job still running instead of paying for
a second one. Works with today's models (default ``gpt-4o-mini-2024-07-18``, chat format) and with
``babbage-002``/``davinci-002`` (completion format); GPT-3 davinci, the paper's, was shut down in 2024.

In full: docs/text.md ("In the code").
"""

from __future__ import annotations

import io
import logging
import random
from functools import partial
from typing import Any

import openai

from tasks.common import storage
from tasks.common.config import TextConfig
from tasks.common.contract import Stats
from tasks.common.errors import PermanentError
from tasks.common.openai_client import RetryPolicy, poll_until, redacted_endpoint, retrying
from tasks.finetune.data import finetune_file_name

log = logging.getLogger("editforge")
ACTIVE = {"validating_files", "queued", "running", "pending"}


class FineTuneJobError(PermanentError, RuntimeError):
    """The fine-tuning job failed or was cancelled; the message carries the job's error."""


def job_error_text(job: Any) -> str:
    err = getattr(job, "error", None)
    if not err or not (getattr(err, "message", None) or getattr(err, "code", None)):
        return "no error given"
    param = f" (param {err.param})" if getattr(err, "param", None) else ""
    return f"{err.code}: {err.message}{param}"


async def finetune_openai(
    client: openai.AsyncOpenAI,
    t: TextConfig,
    files: dict[str, bytes],
    state_url: str,
    stats: Stats,
    logger: logging.Logger = log,
) -> dict[str, Any]:
    """Run (or resume) the fine-tuning job; return the model id and job metadata for the manifest."""
    o = t.openai
    retried = retrying(RetryPolicy.from_config(o), random.Random(t.seed), stats)
    fmt = "chat" if o.endpoint == "chat" else "completion"
    job, resumed = None, False
    state = storage.read_json(state_url) if storage.exists(state_url) else None
    if state:
        job = await retried(lambda: client.fine_tuning.jobs.retrieve(state["job_id"]))
        if job.status in ACTIVE or job.status == "succeeded":
            resumed = True
            stats.add("finetune_jobs_resumed")
            logger.info("fine-tune: resuming job %s (%s) instead of creating another", job.id, job.status)
        else:
            storage.remove(state_url)
            raise FineTuneJobError(f"fine-tuning job {job.id} {job.status}: {job_error_text(job)}")
    if job is None:
        train_bytes, val_bytes = (
            files[finetune_file_name("train", fmt)],
            files[finetune_file_name("val", fmt)],
        )
        train = await retried(
            lambda: client.files.create(
                file=(finetune_file_name("train", fmt), io.BytesIO(train_bytes)), purpose="fine-tune"
            )
        )
        val = None
        if val_bytes:
            val = await retried(
                lambda: client.files.create(
                    file=(finetune_file_name("val", fmt), io.BytesIO(val_bytes)), purpose="fine-tune"
                )
            )
        extra: dict[str, Any] = {}
        if o.finetune_epochs:
            extra["method"] = {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": o.finetune_epochs}},
            }
        job = await retried(
            lambda: client.fine_tuning.jobs.create(
                model=o.base_model,
                training_file=train.id,
                validation_file=val.id if val else None,
                suffix=o.finetune_suffix or None,
                seed=t.seed,
                **extra,
            )
        )
        storage.write_json_atomic(
            state_url,
            {"job_id": job.id, "training_file": train.id, "validation_file": val.id if val else None},
        )
        stats.add("finetune_jobs_created")
        logger.info(
            "fine-tune: job %s created on %s (base model %s, %s format)",
            job.id,
            redacted_endpoint(o),
            o.base_model,
            fmt,
        )
    job = await _poll(client, retried, job, o.poll_interval_s, o.poll_timeout_s, logger)
    if job.status != "succeeded":
        storage.remove(state_url)
        raise FineTuneJobError(f"fine-tuning job {job.id} {job.status}: {job_error_text(job)}")
    if not job.fine_tuned_model:
        raise FineTuneJobError(f"fine-tuning job {job.id} succeeded without a fine_tuned_model")
    hyper = getattr(job, "hyperparameters", None)
    return {
        "model": job.fine_tuned_model,
        "job_id": job.id,
        "status": job.status,
        "base_model": job.model,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "result_files": list(job.result_files or []),
        "seed": job.seed,
        "hyperparameters": hyper.model_dump(mode="json") if hyper is not None else None,
        "format": fmt,
        "endpoint": redacted_endpoint(o),
        "resumed": resumed,
    }


async def _poll(
    client: openai.AsyncOpenAI, retried, job: Any, interval: float, timeout: float, logger: logging.Logger
) -> Any:
    """Poll until the job ends, logging status changes and new events (step, loss) as progress."""
    last_status, seen_events = None, set()

    async def report(job: Any) -> None:
        nonlocal last_status
        if job.status != last_status:
            logger.info("fine-tune: job %s %s (trained tokens: %s)", job.id, job.status, job.trained_tokens)
            last_status = job.status
        try:
            page = await retried(partial(client.fine_tuning.jobs.list_events, job.id, limit=20))
            for event in reversed(page.data):
                if event.id not in seen_events:
                    seen_events.add(event.id)
                    logger.info("fine-tune: job %s: %s", job.id, event.message)
        except openai.NotFoundError:
            pass  # a server without the events endpoint: status changes are the progress

    return await poll_until(
        partial(retried, partial(client.fine_tuning.jobs.retrieve, job.id)),
        lambda job: job.status not in ACTIVE,
        report,
        interval,
        timeout,
        f"fine-tuning job {job.id}",
        first=job,
    )
