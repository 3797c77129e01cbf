"""Text stage: one edit triplet per caption of a partition, with the fine-tuned LM.

    run(cfg, partition_id)  -> manifest of `text/part-XXXXX/triplets.parquet`

Every partition writes `triplets.parquet` with one row per caption: `ok`, or `rejected` with one
reason (see `tasks.text.format`), sorted by caption id, and the attempt its answer came from
(`text.max_attempts` tries while a completion is rejected, each with its own seed). Generation checkpoints as it goes (per batch
locally, per chunk of answers online, per batch job), so a killed run restarts where it stopped and
ends with exactly the rows of an uninterrupted run. The fine-tune it reads is its own stage
(`tasks.finetune.stage`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import pandas as pd

from tasks.common import layout, storage
from tasks.common.config import PipelineConfig, check_text_lm
from tasks.common.contract import Checkpoint, PartitionRun
from tasks.common.stage import execute
from tasks.finetune.stage import finetuned_model, finetuned_model_id
from tasks.text.format import TRIPLET_COLUMNS, attempt_counts, canonical_triplets, mark_duplicates
from tasks.text.local_backend import generate_partition
from tasks.text.spec import TEXT

STAGE = "text"
log = logging.getLogger("editforge")


def run(
    cfg: PipelineConfig,
    partition_id: int,
    *,
    logger: logging.Logger | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Generate one triplet per caption of the partition (see module doc).

    `on_chunk(n)` is called after the n-th checkpoint chunk of the openai backend is written (a hook
    for progress reporting and for crash tests).
    """
    logger = logger or log
    check_text_lm(cfg, f"text part-{partition_id:05d}")  # the tiny LM refused before any work (paper, fast)

    def work(run: PartitionRun) -> None:
        captions = storage.read_parquet(run.input_path("captions", layout.CAPTIONS_FILE))
        run.stats.add("in", len(captions))
        checkpoint = run.checkpoint("caption_id", expected=len(captions), ok=("status", "ok"))
        if cfg.text.backend == "local":
            generate_partition(
                cfg, captions, checkpoint, run.stats, lambda: finetuned_model(cfg), partition_id, logger
            )
        else:
            _generate_openai(cfg, run, captions, checkpoint, partition_id, logger, on_chunk)
        _assemble(run, checkpoint, cfg.text.max_attempts)

    return execute(cfg, TEXT, partition_id, work, logger)


def _generate_openai(
    cfg: PipelineConfig,
    run: PartitionRun,
    captions: pd.DataFrame,
    checkpoint: Checkpoint,
    partition_id: int,
    logger: logging.Logger,
    on_chunk: Callable[[int], None] | None,
) -> None:
    from tasks.text.openai_api import make_client, resolve_api_key, run_sync
    from tasks.text.openai_batch import generate_batch
    from tasks.text.openai_generate import ChunkWriter, generate_online, moderate_captions, moderation_rows

    t, o = cfg.text, cfg.text.openai
    done = checkpoint.done_keys()
    pending = [(cid, text) for cid, text in zip(captions["caption_id"], captions["text"]) if cid not in done]
    if done:
        logger.info(
            "text part-%05d: resuming, %d of %d captions already answered",
            partition_id,
            len(captions) - len(pending),
            len(captions),
        )
    if not pending:
        return
    model = finetuned_model_id(cfg)
    api_key = resolve_api_key(o)
    rng = random.Random(f"{t.seed}:{partition_id}")

    async def go() -> None:
        async with make_client(o, api_key) as client:
            writer = ChunkWriter(client, t, checkpoint, run.stats, rng, on_chunk)
            todo = pending
            if o.moderation:
                flagged = await moderate_captions(client, t, pending, run.stats, rng)
                for row in moderation_rows(t, pending, flagged, model):
                    writer.add(row)
                todo = [c for c in pending if c[0] not in flagged]
            with run.stats.timer("generate"):
                if o.mode == "batch":
                    await writer.flush(moderate_output=False)
                    await generate_batch(
                        client,
                        t,
                        model,
                        todo,
                        writer,
                        run.stats,
                        rng,
                        storage.url_join(layout.progress_dir(run.dir, run.config_hash), "openai-batch.json"),
                        partition_id,
                        logger,
                    )
                else:
                    await generate_online(client, t, model, todo, writer, run.stats, rng, logger)

    run_sync(go)


def _assemble(run: PartitionRun, checkpoint: Checkpoint, max_attempts: int) -> None:
    """Checkpoint chunks -> `triplets.parquet` (sorted, duplicates marked) and the partition's counts;
    with retries (`max_attempts` > 1) also `attempt_<k>_<reason>` / `accepted_attempt_<k>` counts."""
    df = checkpoint.load()
    df = mark_duplicates(df[TRIPLET_COLUMNS]) if len(df) else pd.DataFrame(columns=TRIPLET_COLUMNS)
    df = canonical_triplets(df)
    storage.write_parquet_atomic(run.output(layout.TRIPLETS_FILE), df)
    ok = df[df["status"] == "ok"]
    run.stats.add("out", len(ok))
    for reason, n in df["reject_reason"].dropna().value_counts().items():
        run.stats.reject(reason, n)
    if max_attempts > 1:  # what each try was rejected for, from the table: a resumed run counts the same
        for name, n in attempt_counts(df).items():
            run.stats.add(name, n)
    if len(ok):
        run.stats.observe("edit_words", ok["edit"].str.split().str.len().to_numpy())
