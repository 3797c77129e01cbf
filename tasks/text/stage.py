"""Text stage: fine-tune the caption LM once, then generate edit triplets per caption partition.

    run_finetune(cfg)                      -> manifest of text's fine-tune (`finetune/part-00000/`)
    run_text_partition(cfg, partition_id)  -> manifest of `text/part-XXXXX/triplets.parquet`

`finetune/part-00000/` always holds the fine-tune files (`{train,val}.{completion,chat}.jsonl`, the
paper's format and the chat format, same split) and, per backend:
- `local`: the fine-tuned model (`model/`: whole model, or the LoRA adapter) trained in-process;
- `openai`: `openai_model.json` with the fine-tuned model id and the job's metadata (also in the
  manifest under `finetune`), from the fine-tuning API, or `text.openai.model` used as is (e.g. an
  open model served by vLLM: no job).

Every partition writes `triplets.parquet` with one row per caption: `ok`, or `rejected` with one
reason (see `tasks.text.format`), sorted by caption id. Generation checkpoints as it goes (per batch
locally, per chunk of answers online, per batch job), so a killed run restarts where it stopped and
ends with exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from prompts.templates import templates_hash
from seed_annotations.schema import load_triplets, split_train_val
from tasks.common import storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import (
    PROGRESS,
    Checkpoint,
    PartitionRun,
    execute_partition,
    partition_dir,
    read_success,
)
from tasks.common.models import load_lm
from tasks.text.finetune_data import finetune_files
from tasks.text.format import TRIPLET_COLUMNS, mark_duplicates
from tasks.text.local_backend import apply_lora, finetune, generate_partition, load_finetuned, place

STAGE = "text"
FINETUNE_STAGE = "finetune"
OPENAI_MODEL_FILE = "openai_model.json"
log = logging.getLogger("editforge")


def finetune_hash(cfg: PipelineConfig, seed_path: str) -> str:
    """What the fine-tuned model depends on: base model, fine-tune settings, seed triplets, templates."""
    t, o = cfg.text, cfg.text.openai
    picked = {
        "backend": t.backend, "val": t.val_fraction, "seed": t.seed, "templates": templates_hash(),
        "seeds_sha": hashlib.sha256(storage.read_bytes(seed_path)).hexdigest(),
    }
    if t.backend == "local":
        picked |= {"lm": cfg.models.lm, "lm_path": cfg.models.lm_path, "method": t.finetune_method,
                   "steps": t.finetune_steps, "bs": t.finetune_batch_size, "lr": t.learning_rate,
                   "device": t.device, "dtype": t.dtype}
        if t.finetune_method == "lora":
            picked |= {"lora": [t.lora_r, t.lora_alpha, t.lora_dropout, list(t.lora_targets)]}
    else:
        picked |= {"base_url": o.base_url, "endpoint": o.endpoint, "base_model": o.base_model, "model": o.model,
                   "epochs": o.finetune_epochs, "suffix": o.finetune_suffix}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def finetuned_model_dir(cfg: PipelineConfig) -> str:
    return storage.url_join(partition_dir(cfg.output_root, FINETUNE_STAGE, 0), "model")


def _progress_url(run: PartitionRun, name: str) -> str:
    return storage.url_join(run.dir, PROGRESS, run.config_hash, name)


def run_finetune(cfg: PipelineConfig, seed_path: str | None = None, logger: logging.Logger | None = None) -> dict:
    """Fine-tune the LM on the seed annotations unless already done for this config (see module doc)."""
    logger = logger or log
    seed_path = seed_path or cfg.text.seed_annotations_path()
    train, val = split_train_val(load_triplets(seed_path), cfg.text.val_fraction, cfg.text.seed)
    t = cfg.text

    def work(run: PartitionRun) -> None:
        for name, data in finetune_files(train, val).items():
            storage.write_bytes_atomic(run.output(name), data)
        run.stats.add("train_examples", len(train))
        run.stats.add("val_examples", len(val))
        if t.backend == "local":
            figures = _finetune_local(cfg, run, train, val)
        else:
            figures = _finetune_openai(cfg, run, logger)
            storage.write_json_atomic(run.output(OPENAI_MODEL_FILE), figures)
        run.extra["finetune"] = figures | {"seed_annotations": seed_path, "backend": t.backend,
                                           "train_examples": len(train), "val_examples": len(val)}
        run.stats.add("out", 1)

    return execute_partition(FINETUNE_STAGE, 0, cfg.output_root, finetune_hash(cfg, seed_path), work, logger)


def _finetune_local(cfg: PipelineConfig, run: PartitionRun, train, val) -> dict:
    t = cfg.text
    model, tokenizer = load_lm(cfg.models.lm, cfg.models.lm_path)
    model = place(model, t)
    if t.finetune_method == "lora":
        model = apply_lora(model, t)
    bar = tqdm(total=t.finetune_steps, desc=f"fine-tune LM ({t.finetune_method})", unit="step", leave=False)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    with run.stats.timer("finetune"):
        figures = finetune(model, tokenizer, train, val, t.finetune_steps, t.finetune_batch_size,
                           t.learning_rate, t.seed, run.stats, progress)
    bar.close()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # a PeftModel saves its adapter only
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            storage.write_bytes_atomic(run.output(f"model/{f.name}"), f.read_bytes())
    return figures | {"base_model": cfg.models.lm_path or cfg.models.lm, "method": t.finetune_method,
                      "trainable_parameters": trainable}


def _finetune_openai(cfg: PipelineConfig, run: PartitionRun, logger: logging.Logger) -> dict:
    from tasks.text.openai_api import make_client, redacted_endpoint, resolve_api_key, run_sync
    from tasks.text.openai_finetune import finetune_openai

    o = cfg.text.openai
    if o.model:
        logger.info("fine-tune: using model %s as is at %s (text.openai.model; no job)", o.model,
                    redacted_endpoint(o))
        return {"model": o.model, "job_id": None, "endpoint": redacted_endpoint(o)}
    api_key = resolve_api_key(o)
    files = {name: storage.read_bytes(run.path(name)) for name in run.outputs if name.endswith(".jsonl")}

    async def go() -> dict:
        async with make_client(o, api_key) as client:
            with run.stats.timer("finetune"):
                return await finetune_openai(client, cfg.text, files, _progress_url(run, "openai-finetune-job.json"),
                                             run.stats, logger)

    return run_sync(go)


def finetuned_model_id(cfg: PipelineConfig) -> str:
    """The model id the openai backend generates with (recorded by `run_finetune`)."""
    if cfg.text.openai.model:
        return cfg.text.openai.model
    done = read_success(partition_dir(cfg.output_root, FINETUNE_STAGE, 0))
    if not done or "finetune" not in done or not done["finetune"].get("model"):
        raise RuntimeError(f"text: no fine-tuned model recorded under {cfg.output_root}/{FINETUNE_STAGE}; "
                           f"run the fine-tune first (run_finetune / the text flow)")
    return done["finetune"]["model"]


def run_text_partition(cfg: PipelineConfig, partition_id: int, logger: logging.Logger | None = None,
                       on_chunk: Callable[[int], None] | None = None) -> dict:
    """Generate one triplet per caption of the partition (see module doc).

    `on_chunk(n)` is called after the n-th checkpoint chunk of the openai backend is written (a hook
    for progress reporting and for crash tests).
    """
    logger = logger or log

    def work(run: PartitionRun) -> None:
        captions = storage.read_parquet(run.input_path("captions", "captions.parquet", cfg.stage_hash("captions")))
        run.stats.add("in", len(captions))
        checkpoint = run.checkpoint("caption_id", expected=len(captions))
        if cfg.text.backend == "local":
            generate_partition(cfg, captions, checkpoint, run.stats, lambda: finetuned_model(cfg), partition_id,
                               logger)
        else:
            _generate_openai(cfg, run, captions, checkpoint, partition_id, logger, on_chunk)
        _assemble(run, checkpoint)

    return execute_partition(STAGE, partition_id, cfg.output_root, cfg.stage_hash(STAGE), work, logger)


def _generate_openai(cfg: PipelineConfig, run: PartitionRun, captions: pd.DataFrame, checkpoint: Checkpoint,
                     partition_id: int, logger: logging.Logger, on_chunk: Callable[[int], None] | None) -> None:
    from tasks.text.openai_api import make_client, resolve_api_key, run_sync
    from tasks.text.openai_batch import generate_batch
    from tasks.text.openai_generate import ChunkWriter, generate_online, moderate_captions, moderation_rows

    t, o = cfg.text, cfg.text.openai
    done = checkpoint.done_keys()
    pending = [(cid, text) for cid, text in zip(captions["caption_id"], captions["text"]) if cid not in done]
    if done:
        logger.info("text part-%05d: resuming, %d of %d captions already answered", partition_id,
                    len(captions) - len(pending), len(captions))
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
                    await generate_batch(client, t, model, todo, writer, run.stats, rng,
                                         _progress_url(run, "openai-batch.json"), partition_id, logger)
                else:
                    await generate_online(client, t, model, todo, writer, run.stats, rng, logger)

    run_sync(go)


def _assemble(run: PartitionRun, checkpoint: Checkpoint) -> None:
    """Checkpoint chunks -> `triplets.parquet` (sorted, duplicates marked) and the partition's counts."""
    df = checkpoint.load()
    df = mark_duplicates(df[TRIPLET_COLUMNS]) if len(df) else pd.DataFrame(columns=TRIPLET_COLUMNS)
    storage.write_parquet_atomic(run.output("triplets.parquet"), df[TRIPLET_COLUMNS])
    ok = df[df["status"] == "ok"]
    run.stats.add("out", len(ok))
    for reason, n in df["reject_reason"].dropna().value_counts().items():
        run.stats.reject(reason, n)
    if len(ok):
        run.stats.observe("edit_words", ok["edit"].str.split().str.len().to_numpy())


_LOADED: dict[str, tuple] = {}


def finetuned_model(cfg: PipelineConfig) -> tuple:
    """The fine-tuned (model, tokenizer), loaded once per process and fine-tune, reused across partitions."""
    done = read_success(partition_dir(cfg.output_root, FINETUNE_STAGE, 0)) or {}
    key = f"{finetuned_model_dir(cfg)}@{done.get('config_hash')}"
    if key not in _LOADED:
        _LOADED.clear()
        with tempfile.TemporaryDirectory() as tmp:
            _LOADED[key] = load_finetuned(cfg, _local_copy(finetuned_model_dir(cfg), Path(tmp) / "m"))
    return _LOADED[key]


def _local_copy(model_url: str, dest: Path) -> Path:
    fs, path = storage.filesystem(model_url)
    if Path(path).is_dir():
        return Path(path)
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return dest
