"""The fine-tune stage's record (see :mod:`tasks.common.stage`).

The fine-tune is one partition (``finetune/<hash>/part-00000``) that every text partition reads. Its hash
covers only what the fine-tuned model depends on — the settings of the backend in use, the seed
triplets and the prompt templates — so sampling settings (``text.temperature``) re-generate triplets
without re-training, and an ``openai`` run never pays for a new job over a local-only setting.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tasks.common import storage
from tasks.common.layout import FINETUNED_MODEL, OPENAI_MODEL_FILE
from tasks.common.stage import Dashboard, Resources, Stage, gpus_for

FINETUNE_COMMON = ("text.backend", "text.val_fraction", "text.seed")
FINETUNE_LOCAL = (
    "models.lm",
    "models.lm_path",
    "text.finetune_method",
    "text.finetune_steps",
    "text.finetune_batch_size",
    "text.learning_rate",
    "text.dtype",
)
FINETUNE_LORA = ("text.lora_r", "text.lora_alpha", "text.lora_dropout", "text.lora_targets")
FINETUNE_OPENAI = (
    "text.openai.base_url",
    "text.openai.endpoint",
    "text.openai.base_model",
    "text.openai.model",
    "text.openai.finetune_epochs",
    "text.openai.finetune_suffix",
)


def finetune_sections(cfg) -> tuple[str, ...]:
    t = cfg.text
    if t.backend == "openai":
        return FINETUNE_COMMON + FINETUNE_OPENAI
    return FINETUNE_COMMON + FINETUNE_LOCAL + (FINETUNE_LORA if t.finetune_method == "lora" else ())


def finetune_inputs(cfg) -> dict[str, Any]:
    """Inputs besides the config: the seed triplets' bytes and the prompt templates."""
    from prompts.templates import templates_hash
    from tasks.world.weights import hash_extra as world_models

    return {
        "templates": templates_hash(),
        "seeds_sha": hashlib.sha256(storage.read_bytes(cfg.text.seed_annotations_path())).hexdigest(),
        **(world_models(cfg, ("lm",)) if cfg.text.backend == "local" else {}),
    }


def finetune_resources(cfg) -> Resources:
    t = cfg.text
    if t.backend == "openai":
        return Resources(1, 0, "-", "a fine-tuning job on the OpenAI-compatible API")
    return Resources(
        1,
        gpus_for(t.device),
        f"{t.finetune_batch_size} examples",
        f"{t.finetune_method} fine-tune of models.lm, {t.dtype}",
    )


FINETUNE = Stage(
    name="finetune",
    dashboard=Dashboard(
        headline=("train_loss_first10", "train_loss_last10", "val_loss", "train_examples", "val_examples")
    ),
    entry="tasks.finetune.stage:run",
    summary="fine-tune the caption LM on the seed triplets (local or the fine-tuning API)",
    reads=(),
    hashes=finetune_sections,
    hash_extra=finetune_inputs,
    outputs=(
        "{train,val}.{completion,chat}.jsonl",
        f"{FINETUNED_MODEL}/ (local) or {OPENAI_MODEL_FILE} (openai)",
    ),
    resources=finetune_resources,
    partitions="one",
)
