"""Text stage: fine-tune the caption LM once, then generate edit triplets per caption partition.

`text/_finetune/` holds the fine-tuned model (safetensors) and its own `_SUCCESS.json`; every
partition then writes `triplets.parquet` with one row per caption — kept or rejected with a reason.
Generation checkpoints every batch (fixed batch boundaries, batch-seeded sampling), so a killed run
restarts at the batch in flight and ends with exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from seed_annotations.schema import default_triplets_path, load_triplets, split_train_val
from tasks.common import storage
from tasks.common.config import PipelineConfig
from tasks.common.contract import PartitionRun, execute_partition
from tasks.common.models import load_lm
from tasks.text.format import parse_completion, validate_triplet
from tasks.text.local_backend import batch_seed, finetune, generate

STAGE = "text"
FINETUNE_STAGE = "finetune"
TRIPLET_COLUMNS = ["caption_id", "input", "edit", "output", "model", "raw_completion", "status", "reject_reason"]


def finetune_hash(cfg: PipelineConfig, seed_path: str) -> str:
    t = cfg.text
    blob = json.dumps({
        "lm": cfg.models.lm, "lm_path": cfg.models.lm_path, "steps": t.finetune_steps, "bs": t.finetune_batch_size,
        "lr": t.learning_rate, "val": t.val_fraction, "seed": t.seed,
        "seeds_sha": hashlib.sha256(storage.read_bytes(seed_path)).hexdigest(),
        "templates": cfg.stage_hash(STAGE),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finetuned_model_dir(cfg: PipelineConfig) -> str:
    return storage.url_join(cfg.output_root, FINETUNE_STAGE, "part-00000", "model")


def run_finetune(cfg: PipelineConfig, seed_path: str | None = None, logger: logging.Logger | None = None) -> dict:
    """Fine-tune the LM on the seed annotations (paper format) unless already done for this config."""
    seed_path = seed_path or str(default_triplets_path())
    triplets = load_triplets(seed_path)
    train, val = split_train_val(triplets, cfg.text.val_fraction, cfg.text.seed)

    def work(run: PartitionRun) -> None:
        model, tokenizer = load_lm(cfg.models.lm, cfg.models.lm_path)
        bar = tqdm(total=cfg.text.finetune_steps, desc="fine-tune LM", unit="step", leave=False)

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        with run.stats.timer("finetune"):
            figures = finetune(model, tokenizer, train, val, cfg.text.finetune_steps, cfg.text.finetune_batch_size,
                               cfg.text.learning_rate, cfg.text.seed, run.stats, progress)
        bar.close()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir()):
                storage.write_bytes_atomic(run.output(f"model/{f.name}"), f.read_bytes())
        run.extra["finetune"] = figures | {"seed_annotations": seed_path, "base_model": cfg.models.lm_path or cfg.models.lm}
        run.stats.add("out", 1)

    return execute_partition(FINETUNE_STAGE, 0, cfg.output_root, finetune_hash(cfg, seed_path), work, logger)


def _local_copy(model_url: str, dest: Path) -> Path:
    fs, path = storage.filesystem(model_url)
    if Path(path).is_dir():
        return Path(path)
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return dest


def run_text_partition(cfg: PipelineConfig, partition_id: int, logger: logging.Logger | None = None) -> dict:
    t = cfg.text
    logger = logger or logging.getLogger("editforge")

    def work(run: PartitionRun) -> None:
        captions = storage.read_parquet(storage.url_join(run.input_dir("captions"), "captions.parquet"))
        run.stats.add("in", len(captions))
        checkpoint = run.checkpoint("caption_id")
        done = checkpoint.done_keys()
        batches = [captions.iloc[i: i + t.batch_size] for i in range(0, len(captions), t.batch_size)]
        pending = [b for b in batches if not set(b["caption_id"]).issubset(done)]
        if len(pending) < len(batches):
            logger.info("text part-%05d: resuming, %d of %d batches already generated",
                                   partition_id, len(batches) - len(pending), len(batches))
        if pending:
            with tempfile.TemporaryDirectory() as tmp:
                model, tokenizer = load_lm(cfg.models.lm, str(_local_copy(finetuned_model_dir(cfg), Path(tmp) / "m")))
                model_name = f"{cfg.models.lm_path or cfg.models.lm}+finetune"
                for batch in tqdm(pending, desc=f"generate triplets p{partition_id}", unit="batch", leave=False):
                    with run.stats.timer("generate"):
                        raws = generate(model, tokenizer, list(batch["text"]), temperature=t.temperature, top_p=t.top_p,
                                        frequency_penalty=t.frequency_penalty, max_new_tokens=t.max_new_tokens,
                                        seed=batch_seed(t.seed, batch["caption_id"].iloc[0]), stop=t.stop)
                    rows = []
                    for (_, cap), raw in zip(batch.iterrows(), raws):
                        parsed = parse_completion(raw)
                        reason = parsed.reject_reason or validate_triplet(cap["text"], parsed.edit, parsed.output)
                        rows.append({"caption_id": cap["caption_id"], "input": cap["text"], "edit": parsed.edit,
                                     "output": parsed.output, "model": model_name, "raw_completion": raw,
                                     "status": "rejected" if reason else "ok", "reject_reason": reason})
                    checkpoint.append(batch["caption_id"].iloc[0], pd.DataFrame(rows, columns=TRIPLET_COLUMNS))
        df = checkpoint.load()
        df = df.sort_values("caption_id").reset_index(drop=True) if len(df) else pd.DataFrame(columns=TRIPLET_COLUMNS)
        storage.write_parquet_atomic(run.output("triplets.parquet"), df[TRIPLET_COLUMNS])
        ok = df[df["status"] == "ok"]
        run.stats.add("out", len(ok))
        for reason, n in df["reject_reason"].dropna().value_counts().items():
            run.stats.reject(reason, n)
        if len(ok):
            run.stats.observe("edit_words", ok["edit"].str.split().str.len().to_numpy())

    return execute_partition(STAGE, partition_id, cfg.output_root, cfg.stage_hash(STAGE), work, logger)
