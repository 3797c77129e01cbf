"""Where everything of a run lives: one module owns the paths, file names and keys (torch-free).

    {output_root}/{stage}/part-{id:05d}/            one partition of a stage (the stage contract)
        _SUCCESS.json                                its manifest, written last
        _progress/<config hash>/                     in-partition checkpoints of an unfinished run
    {output_root}/{stage}/_leases/part-{id:05d}.json the lease of the process working on a partition
    {output_root}/captions/_plan/<hash>.parquet      the captions stage's global plan (all partitions)
    {output_root}/captions/_source_stats.json        rejections while reading the sources
    {output_root}/finetune/part-00000/model/         the fine-tuned caption LM
    {output_root}/render/part-N/images/<key>_{input,edited}.png
    {output_root}/pack/index.json                    every shard of the run, per split

Stages and flows ask this module for a path instead of spelling it, so a name is written once.
"""

from __future__ import annotations

import re

from tasks.common import storage

SUCCESS = "_SUCCESS.json"
PROGRESS = "_progress"

# one file per partition that the next stage reads
CAPTIONS_FILE = "captions.parquet"
TRIPLETS_FILE = "triplets.parquet"
SAMPLES_FILE = "samples.parquet"
KEPT_FILE = "kept.parquet"
INDEX_FILE = "index.json"
FINETUNED_MODEL = "model"
OPENAI_MODEL_FILE = "openai_model.json"

# a run's name is part of its dashboard keys; Prefect allows lowercase letters, digits and dashes there
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
_NAME_RE = re.compile(NAME_PATTERN)


def partition_name(partition_id: int) -> str:
    return f"part-{partition_id:05d}"


def partition_dir(output_root: str, stage: str, partition_id: int) -> str:
    return storage.url_join(output_root, stage, partition_name(partition_id))


def partition_file(output_root: str, stage: str, partition_id: int, name: str) -> str:
    return storage.url_join(partition_dir(output_root, stage, partition_id), name)


def success_url(output_root: str, stage: str, partition_id: int) -> str:
    return partition_file(output_root, stage, partition_id, SUCCESS)


def progress_dir(run_dir: str, config_hash: str) -> str:
    """A partition's checkpoints, keyed by config hash: chunks of another config are never reused."""
    return storage.url_join(run_dir, PROGRESS, config_hash)


def lease_url(output_root: str, stage: str, partition_id: int) -> str:
    """Who is working on a partition (outside it, so that nothing the partition holds is the lease)."""
    return storage.url_join(output_root, stage, "_leases", f"{partition_name(partition_id)}.json")


def captions_plan_url(output_root: str, config_hash: str) -> str:
    return storage.url_join(output_root, "captions", "_plan", f"{config_hash}.parquet")


def source_stats_url(output_root: str) -> str:
    return storage.url_join(output_root, "captions", "_source_stats.json")


def finetuned_model_dir(output_root: str) -> str:
    return partition_file(output_root, "finetune", 0, FINETUNED_MODEL)


def index_url(output_root: str) -> str:
    """`pack/index.json`: the shards of every pack partition."""
    return storage.url_join(output_root, "pack", INDEX_FILE)


def sample_key(caption_id: str, seed: int) -> str:
    """WebDataset-safe key (no dots): `{caption_id}_{seed}`."""
    return f"{caption_id}_{seed}"


def image_name(key: str, which: str) -> str:
    """A rendered image inside a render partition; ``which`` is ``input`` or ``edited``."""
    return f"images/{key}_{which}.png"


def check_name(name: str) -> str:
    """A run name usable in dashboard keys, or ValueError saying how to fix it."""
    if not _NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a valid run name: use lowercase letters, digits and dashes, starting "
                         f"with a letter or digit (e.g. {re.sub('[^a-z0-9-]+', '-', name.lower()).strip('-') or 'my-run'!r}); "
                         "it names the run's dashboard artifacts")
    return name


def artifact_key(name: str, topic: str) -> str:
    """The dashboard key of a run's artifact: `editforge-<name>-<topic>` (stage name or `summary`)."""
    return f"editforge-{check_name(name)}-{topic}"
