"""Judge stage: the vision-language judge grades the candidate pairs render stored.

    run(cfg, partition_id)  -> manifest of `judge/part-XXXXX/judgments.parquet`

Candidates (:func:`candidates`) are the stored pairs that passed every rung render applied; each is one
chat request through the text backend's OpenAI machinery (requests in flight or Batch API jobs),
checkpointed by sample key so a killed run never asks a judged sample again. With the rung off the table is
empty. The key is never written anywhere.

Requests, refusals, the table and the manifest in full: docs/judge.md ("In the code").
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from functools import partial

import openai
import pandas as pd

from tasks.common import layout, storage
from tasks.common.config import PipelineConfig, VLMJudgeConfig
from tasks.common.contract import Checkpoint, PartitionRun
from tasks.common.layout import JUDGMENTS_FILE, SAMPLES_FILE, image_name
from tasks.common.stage import execute
from tasks.judge.cost import row_costs, spent
from tasks.judge.spec import STAGE as JUDGE
from tasks.judge.vlm import JUDGMENT_COLUMNS, RUBRIC, image_url, input_sha, judgment_row, request_body

STAGE = "judge"
CHAT = "/v1/chat/completions"
COLUMNS = [*JUDGMENT_COLUMNS, "vlm_cost_usd"]
log = logging.getLogger("editforge")


def candidates(samples: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """The samples the VLM judge grades (see module doc), sorted by sample key."""
    if not len(samples):
        return samples
    ok = samples["image_stored"].astype(bool) & ~samples["early_rejected"].astype(bool)
    if cfg.judges.vlm.candidates == "passed":
        ok &= samples["passed"].astype(bool)
    return samples[ok].sort_values("sample_key").reset_index(drop=True)


def run(
    cfg: PipelineConfig,
    partition_id: int,
    *,
    logger: logging.Logger | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Judge one partition's candidates (see module doc); ``on_chunk(n)`` is called after the n-th
    checkpoint chunk is written (progress, crash tests)."""
    logger = logger or log
    v = cfg.judges.vlm

    def work(run: PartitionRun) -> None:
        samples = storage.read_parquet(run.input_path("render", SAMPLES_FILE))
        cands = candidates(samples, cfg)
        run.stats.add("in", len(cands))
        if not v.enabled:  # the rung is off: nothing is asked, every candidate passes through it
            storage.write_parquet_atomic(run.output(JUDGMENTS_FILE), pd.DataFrame(columns=COLUMNS))
            run.stats.add("out", len(cands))
            run.figures["vlm"] = "off"
            return
        checkpoint = run.checkpoint("sample_key", expected=len(cands))
        done = checkpoint.done_keys()
        pending = cands[~cands["sample_key"].isin(done)]
        if done:
            logger.info(
                "judge part-%05d: resuming, %d of %d candidates already judged",
                partition_id,
                len(cands) - len(pending),
                len(cands),
            )
        if len(pending):
            with run.stats.timer("judge"):
                _judge(cfg, run, pending, cands, checkpoint, partition_id, logger, on_chunk)
        _assemble(run, checkpoint, cands, v)

    return execute(cfg, JUDGE, partition_id, work, logger)


def _judge(
    cfg: PipelineConfig,
    run: PartitionRun,
    pending: pd.DataFrame,
    cands: pd.DataFrame,
    checkpoint: Checkpoint,
    partition_id: int,
    logger: logging.Logger,
    on_chunk: Callable[[int], None] | None,
) -> None:
    from tasks.common.openai_client import (
        RetryPolicy,
        create_completion,
        make_client,
        resolve_api_key,
        retrying,
        run_sync,
    )
    from tasks.common.openai_pool import ChunkBuffer, serve

    v = cfg.judges.vlm
    api_key = resolve_api_key(v)
    rng = random.Random(f"judge:{v.seed}:{partition_id}")
    render_dir = run.input_dir("render")
    stats = run.stats

    def body_of(sample) -> tuple[dict, str]:
        urls = [
            image_url(
                storage.read_bytes(storage.url_join(render_dir, image_name(sample.sample_key, which))), v
            )
            for which in ("input", "edited")
        ]
        return request_body(v, sample.edit, sample.input, sample.output, urls), input_sha(urls)

    async def go() -> None:
        async with make_client(v, api_key) as client:
            retried = retrying(RetryPolicy.from_config(v), rng, stats)
            writer = ChunkBuffer(
                checkpoint,
                stats,
                JUDGMENT_COLUMNS,
                "sample_key",
                v.checkpoint_every,
                v.checkpoint_interval_s,
                on_chunk,
            )

            async def ask(sample) -> list[dict]:
                body, sha = await asyncio.to_thread(body_of, sample)
                try:
                    answer = await retried(
                        partial(create_completion, client, "chat", body, v.request_timeout_s)
                    )
                except openai.APIStatusError as err:
                    if err.status_code >= 500 or err.status_code in (408, 409, 429):
                        raise
                    logger.warning(
                        "judge: request for sample %s refused (HTTP %s): %s",
                        sample.sample_key,
                        err.status_code,
                        str(err)[:300],
                    )
                    return [
                        judgment_row(
                            sample.sample_key,
                            sample.caption_id,
                            v,
                            raw=None,
                            status="refused",
                            error=f"HTTP {err.status_code}: {str(err)[:200]}",
                            sha=sha,
                        )
                    ]
                stats.add("requests_answered")
                return [
                    judgment_row(
                        sample.sample_key,
                        sample.caption_id,
                        v,
                        raw=answer.text,
                        prompt_tokens=answer.prompt_tokens,
                        completion_tokens=answer.completion_tokens,
                        sha=sha,
                    )
                ]

            items = list(pending.itertuples(index=False))
            if v.mode == "batch":
                await _judge_batch(
                    client, v, retried, items, cands, body_of, writer, ask, run, partition_id, logger
                )
            else:
                await serve(items, ask, v.concurrency, writer, logger, "judge")

    run_sync(go)


async def _judge_batch(
    client,
    v: VLMJudgeConfig,
    retried,
    items: list,
    cands: pd.DataFrame,
    body_of,
    writer,
    ask,
    run: PartitionRun,
    partition_id: int,
    logger: logging.Logger,
) -> None:
    """Batch API jobs over fixed groups of the candidates (resumable by group), polled together; what a job
    leaves unanswered is asked online."""
    from tasks.common.openai_batch import run_batch_job
    from tasks.common.openai_client import completion_of
    from tasks.common.openai_pool import serve

    pending = {s.sample_key: s for s in items}
    keys = cands["sample_key"].tolist()  # groups over every candidate: a resumed run finds the same groups
    size = v.batch_max_requests
    groups = [keys[i : i + size] for i in range(0, len(keys), size)]
    progress = layout.progress_dir(run.dir, run.config_hash)
    label = f"judge part-{partition_id:05d}"
    missing: list = []

    async def one(index: int, group: list[str]) -> None:
        todo = [pending[k] for k in group if k in pending]
        if not todo:
            return
        shas: dict[str, str] = {}

        def payload() -> bytes:
            from tasks.common.openai_batch import batch_lines

            lines = []
            for sample in todo:
                body, shas[sample.sample_key] = body_of(sample)
                lines.append((sample.sample_key, body))
            return batch_lines(lines, CHAT)

        batch, bodies = await run_batch_job(
            client,
            retried,
            run.stats,
            state_url=storage.url_join(progress, f"vlm-batch-{index:05d}.json"),
            custom_ids=[s.sample_key for s in todo],
            payload=lambda: payload(),
            file_name=f"editforge-judge-part-{partition_id:05d}-{index:05d}.jsonl",
            endpoint=CHAT,
            metadata={
                "editforge_stage": "judge",
                "editforge_partition": str(partition_id),
                "editforge_group": str(index),
            },
            interval_s=v.poll_interval_s,
            timeout_s=v.poll_timeout_s,
            label=label,
            note=f" (group {index})",
            logger=logger,
        )
        run.stats.add("batch_answered", len(bodies))
        for sample in todo:
            if sample.sample_key not in bodies:
                missing.append(sample)
                continue
            answer = completion_of("chat", bodies[sample.sample_key])
            sha = shas.get(sample.sample_key) or (await asyncio.to_thread(body_of, sample))[1]
            writer.add(
                judgment_row(
                    sample.sample_key,
                    sample.caption_id,
                    v,
                    raw=answer.text,
                    prompt_tokens=answer.prompt_tokens,
                    completion_tokens=answer.completion_tokens,
                    batch=True,
                    sha=sha,
                )
            )
            if writer.due():
                await writer.flush()
        await writer.flush()
        if batch.status != "completed":
            logger.info("%s: batch %s ended %s", label, batch.id, batch.status)

    await asyncio.gather(*(one(i, g) for i, g in enumerate(groups)))
    if missing:
        logger.info(
            "%s: %d requests left unanswered by the batch jobs; sending them online", label, len(missing)
        )
        run.stats.add("batch_fallback_online", len(missing))
        await serve(sorted(missing, key=lambda s: s.sample_key), ask, v.concurrency, writer, logger, "judge")


def _assemble(run: PartitionRun, checkpoint: Checkpoint, cands: pd.DataFrame, v: VLMJudgeConfig) -> None:
    """Checkpoint chunks -> `judgments.parquet` (one row per candidate, sorted) and the partition's counts."""
    rows = checkpoint.load()
    if len(rows):
        rows = rows[rows["sample_key"].isin(set(cands["sample_key"]))]
        rows = (
            rows.drop_duplicates("sample_key", keep="last").sort_values("sample_key").reset_index(drop=True)
        )
        rows["vlm_cost_usd"] = row_costs(rows, v)
    else:
        rows = pd.DataFrame(columns=COLUMNS)
    rows = rows[COLUMNS]
    storage.write_parquet_atomic(run.output(JUDGMENTS_FILE), rows)
    status = rows["vlm_status"].value_counts()
    run.stats.add("out", int(status.get("ok", 0)))
    for name in ("unparseable", "refused"):
        if status.get(name, 0):
            run.stats.reject(f"vlm_{name}", int(status[name]))
    totals = spent(rows)
    run.stats.add("vlm_judged", totals["judged"])
    run.stats.add("vlm_prompt_tokens", totals["prompt_tokens"])
    run.stats.add("vlm_completion_tokens", totals["completion_tokens"])
    run.stats.add("vlm_batch_answered", int(rows["vlm_batch"].astype(bool).sum()) if len(rows) else 0)
    run.stats.observe("vlm_score", rows["vlm_score"].to_numpy(dtype=float))
    run.figures.update({"vlm_model": v.model, "vlm_rubric": RUBRIC, "vlm_cost_usd": totals["cost_usd"]})
    if totals["judged"] and totals["cost_usd"] is not None:
        run.figures["vlm_cost_per_judged_usd"] = round(totals["cost_usd"] / totals["judged"], 10)
    if totals["judged"]:
        run.figures["vlm_tokens_per_judged"] = round(
            (totals["prompt_tokens"] + totals["completion_tokens"]) / totals["judged"], 1
        )
    seconds = run.stats.timings.get("judge", 0.0)
    if seconds > 0 and run.stats.counts.get("requests_answered"):
        run.figures["judged_per_s"] = round(run.stats.counts["requests_answered"] / seconds, 3)
