"""The text stage's record (see :mod:`tasks.common.stage`): one triplet per caption, with the fine-tuned LM
of :mod:`tasks.finetune` (whose hash is part of this one's)."""

from __future__ import annotations

from tasks.captions.spec import STAGE as CAPTIONS
from tasks.common.layout import TRIPLETS_FILE
from tasks.common.stage import Dashboard, Resources, Stage, gpus_for
from tasks.finetune.spec import FINETUNE


def text_resources(cfg) -> Resources:
    t = cfg.text
    if t.backend == "openai":
        return Resources(
            1,
            0,
            f"{t.openai.concurrency} requests in flight",
            f"OpenAI-compatible API ({t.openai.mode} mode)",
        )
    return Resources(
        1, gpus_for(t.device), f"{t.batch_size} captions", "local generation with the fine-tuned LM"
    )


TEXT = Stage(
    name="text",
    entry="tasks.text.stage:run",
    summary="one (edit, output caption) per caption with the fine-tuned LM; parse, validate",
    reads=(CAPTIONS, FINETUNE),
    hashes=("text", "models.lm", "models.lm_path"),
    outputs=(TRIPLETS_FILE,),
    resources=text_resources,
    retries=2,
    one_at_a_time=True,  # the worker's GPU (or the API quota) is shared
    progress=True,
    dashboard=Dashboard(
        headline=("out_rate", "n_batches_generated", "n_retried_captions"), run_pass_rate=("out", "in")
    ),
)
