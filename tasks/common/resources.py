"""What each stage needs to run one partition: CPUs, GPUs, batch size (as NeMo Curator's stages declare).

Derived from the config, so it follows the preset and every ``--set``: ``render`` on ``device: cpu``
needs no GPU, ``text`` on the ``openai`` backend needs none either (its parallelism is requests in
flight). The flows turn it into Prefect task tags (``editforge-gpu`` on every task run that holds a
GPU), so a tag concurrency limit bounds the GPU task runs of a whole server::

    prefect concurrency-limit create editforge-gpu 8     # at most 8 GPU partitions at once, any deployment

and ``editforge config`` prints it. The work pools place the flow runs (``infra/prefect.yaml``: the
GPU deployments ask the Kubernetes pool for one GPU per flow run); these declarations say what a
partition uses once it is there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tasks.common.config import PipelineConfig

GPU_TAG = "editforge-gpu"


@dataclass(frozen=True)
class StageResources:
    """One partition task's needs: ``gpus`` is 0 or 1 (a partition never spans GPUs)."""

    cpus: int
    gpus: int
    batch: str
    note: str = ""

    def tags(self, stage: str) -> list[str]:
        """Prefect task-run tags: the stage, and the GPU tag when a GPU is held."""
        return ["editforge", f"editforge-{stage}", *([GPU_TAG] if self.gpus else [])]

    def as_dict(self) -> dict:
        return asdict(self)


def _gpus(device: str) -> int:
    """``auto`` asks for a GPU (it runs on the CPU only when none is visible); ``cpu`` does not."""
    return 0 if device == "cpu" else 1


def stage_resources(cfg: PipelineConfig) -> dict[str, StageResources]:
    """The resources of every stage of the generation DAG plus ``finetune`` and ``train``, for ``cfg``."""
    t, r = cfg.text, cfg.render
    if t.backend == "openai":
        finetune = StageResources(1, 0, "-", "a fine-tuning job on the OpenAI-compatible API")
        text = StageResources(1, 0, f"{t.openai.concurrency} requests in flight",
                              f"OpenAI-compatible API ({t.openai.mode} mode)")
    else:
        finetune = StageResources(1, _gpus(t.device), f"{t.finetune_batch_size} examples",
                                  f"{t.finetune_method} fine-tune of models.lm, {t.dtype}")
        text = StageResources(1, _gpus(t.device), f"{t.batch_size} captions", "local generation with the fine-tuned LM")
    batch = "auto (free GPU memory)" if r.batch_samples == "auto" else str(r.batch_samples)
    return {
        "captions": StageResources(1, 0, "-", "streams parquet; one global plan"),
        "finetune": finetune,
        "text": text,
        "render": StageResources(1, _gpus(r.device), f"{batch} samples per UNet call (x4 images)",
                                 f"{cfg.models.diffusion} + CLIP {cfg.models.clip}, {r.dtype}"),
        "filter": StageResources(1, 0, "-", "re-selection from samples.parquet"),
        "pack": StageResources(1, 0, f"{cfg.pack.shard_max_samples} samples per shard", "JPEG/PNG encoding"),
        "train": StageResources(1, _gpus(cfg.train.device), f"{cfg.train.batch_size} x {cfg.train.gradient_accumulation_steps} accumulation",
                                "one process; multi-GPU through `accelerate launch`"),
    }
