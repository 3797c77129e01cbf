"""The fine-tune: the caption LM trained once on the seed triplets, read by every text partition.

    run(cfg, 0)  -> manifest of `finetune/<hash>/part-00000/`

`finetune/<hash>/part-00000/` always holds the fine-tune files (`{train,val}.{completion,chat}.jsonl`, the
paper's format and the chat format, same split) and, per backend:
- `local`: the fine-tuned model (`model/`: whole model, or the LoRA adapter) trained in-process;
- `openai`: `openai_model.json` with the fine-tuned model id and the job's metadata (also in the
  manifest under `finetune`), from the fine-tuning API, or `text.openai.model` used as is (e.g. an
  open model served by vLLM: no job).

Its hash (`tasks.finetune.spec.FINETUNE`) covers only what the model depends on.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from seed_annotations.schema import SeedAnnotationError, load_triplets, split_train_val
from tasks.common import layout, storage
from tasks.common.config import PipelineConfig, check_text_lm
from tasks.common.contract import PartitionRun, finished
from tasks.common.contract import figures as contract_figures
from tasks.common.errors import MissingFileError, PermanentError
from tasks.common.models import MODELS, load_lm
from tasks.common.stage import execute, stage_hash
from tasks.finetune.data import finetune_files
from tasks.finetune.local import FinetuneCheckpoint, apply_lora, finetune, load_finetuned, place
from tasks.finetune.spec import FINETUNE

STAGE = "finetune"
log = logging.getLogger("editforge")


class SeedFileError(PermanentError, SeedAnnotationError):
    """The seed triplets file is refused (the message names the file, the line and the field)."""


def run(cfg: PipelineConfig, partition_id: int = 0, *, logger: logging.Logger | None = None) -> dict:
    """Fine-tune the LM on the seed annotations unless already done for this config (see module doc)."""
    logger = logger or log
    check_text_lm(cfg, "finetune")  # the tiny LM refused before any work (paper, fast)
    seed_path = cfg.text.seed_annotations_path()
    # the same validation as `python -m seed_annotations.download`: keys besides input/edit/output are ignored
    try:
        seeds = load_triplets(seed_path, strict=False, max_line_bytes=cfg.text.seed_max_line_bytes)
    except SeedAnnotationError as err:  # the file's content: a retry reads the same bytes
        raise SeedFileError(str(err)) from err
    except FileNotFoundError as err:
        raise MissingFileError(f"text.seed_annotations: {seed_path} is not there ({err})") from err
    train, val = split_train_val(seeds, cfg.text.val_fraction, cfg.text.seed)
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
            storage.write_json_atomic(run.output(layout.OPENAI_MODEL_FILE), figures)
        run.figures["finetune"] = figures | {
            "seed_annotations": seed_path,
            "backend": t.backend,
            "train_examples": len(train),
            "val_examples": len(val),
        }
        run.stats.add("out", 1)

    return execute(cfg, FINETUNE, partition_id, work, logger)


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
        figures = finetune(
            model,
            tokenizer,
            train,
            val,
            t.finetune_steps,
            t.finetune_batch_size,
            t.learning_rate,
            t.seed,
            run.stats,
            progress,
            FinetuneCheckpoint(
                storage.url_join(layout.progress_dir(run.dir, run.config_hash), "finetune"),
                t.finetune_checkpoint_every,
            ),
        )
    bar.close()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # a PeftModel saves its adapter only
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            storage.write_bytes_atomic(run.output(f"{layout.FINETUNED_MODEL}/{f.name}"), f.read_bytes())
    return figures | {
        "base_model": cfg.models.lm_path or cfg.models.lm,
        "method": t.finetune_method,
        "trainable_parameters": trainable,
    }


def _finetune_openai(cfg: PipelineConfig, run: PartitionRun, logger: logging.Logger) -> dict:
    from tasks.common.openai_client import make_client, redacted_endpoint, resolve_api_key, run_sync
    from tasks.finetune.openai_job import finetune_openai

    o = cfg.text.openai
    if o.model:
        logger.info(
            "fine-tune: using model %s as is at %s (text.openai.model; no job)", o.model, redacted_endpoint(o)
        )
        return {"model": o.model, "job_id": None, "endpoint": redacted_endpoint(o)}
    api_key = resolve_api_key(o)
    files = {name: storage.read_bytes(run.path(name)) for name in run.outputs if name.endswith(".jsonl")}

    async def go() -> dict:
        async with make_client(o, api_key) as client:
            with run.stats.timer("finetune"):
                return await finetune_openai(
                    client,
                    cfg.text,
                    files,
                    storage.url_join(
                        layout.progress_dir(run.dir, run.config_hash), "openai-finetune-job.json"
                    ),
                    run.stats,
                    logger,
                )

    return run_sync(go)


def finetuned_model_id(cfg: PipelineConfig) -> str:
    """The model id the openai backend generates with (recorded by `run_finetune`)."""
    if cfg.text.openai.model:
        return cfg.text.openai.model
    h = stage_hash(cfg, FINETUNE)
    done = finished(layout.partition_dir(cfg.output_root, STAGE, h, 0), h)
    summary = contract_figures(done).get("finetune") if done else None
    if not isinstance(summary, dict) or not summary.get("model"):
        raise RuntimeError(
            f"text: no fine-tuned model recorded under {cfg.output_root}/{STAGE}; "
            f"run the finetune stage first (editforge stage finetune)"
        )
    return summary["model"]


def finetuned_model(cfg: PipelineConfig) -> tuple:
    """The fine-tuned (model, tokenizer) on ``text.device``, from the process's model cache: loaded once
    per fine-tune (its hash) and reused across partitions and sampling settings."""
    t = cfg.text
    model_url = layout.finetuned_model_dir(cfg.output_root, stage_hash(cfg, FINETUNE))
    identity = (model_url, t.device, t.dtype)

    def load() -> tuple:
        with tempfile.TemporaryDirectory() as tmp:
            return load_finetuned(cfg, _local_copy(model_url, Path(tmp) / "m"))

    return MODELS.get("lm", identity, load)


def _local_copy(model_url: str, dest: Path) -> Path:
    fs, path = storage.filesystem(model_url)
    if Path(path).is_dir():
        return Path(path)
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return dest
