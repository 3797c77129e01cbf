"""Where everything of a run lives: one module owns the paths, file names and keys (torch-free).

Every stage writes into a folder named by its config hash, so a run whose config changes what a
stage outputs (an override, a new model, a threshold) writes a new version next to the old one and
never over it, and what did not change is reused (a new filter threshold reads the same renders)::

    {output_root}/{stage}/{hash}/part-{id:05d}/           one partition of a stage (the stage contract)
        _SUCCESS.json                                   its manifest, written last
        _progress/<hash>/                               in-partition checkpoints of an unfinished run
    {output_root}/{stage}/{hash}/_leases/part-{id:05d}.json  the process working on a partition
    {output_root}/captions/{hash}/_generations/gen-{g:05d}.{parquet,json}
                                                        the captions taken by each generation (append-only)
    {output_root}/finetune/{hash}/part-00000/model/     the fine-tuned caption LM
    {output_root}/render/{hash}/part-N/images/<key>_{input,edited}.png
    {output_root}/judge/{hash}/part-N/judgments.parquet  the VLM judge's grades of render's candidates
    {output_root}/pack/{hash}/index.json                every shard of that version, per split
    {output_root}/train/_work/<weights key>/checkpoints/ training's checkpoints (shared by versions that
                                                        differ only in the sample-edit settings)
    {output_root}/report/{pack hash}/report.html, *.png  the run's report (plots, pair grids)
    {output_root}/review/{render hash}/labels.parquet/<reviewer>-<writer>-<session>-<chunk>.parquet
                                                        people's labels of rendered pairs (`editforge review`):
                                                        a parquet dataset, one part per writing session
    {output_root}/review/{render hash}/calibration.json, filter.set, people_vs_filter.png
                                                        `editforge calibrate-filter`'s figures and override
    {output_root}/eval/{hash}/{metrics.json,eval.parquet,eval.png,examples.png}
                                                        an evaluation of an editing model (hash: model,
                                                        held-out shards, CLIP model, settings)

Stages and flows ask this module for a path instead of spelling it, so a name is written once;
:func:`tasks.registry.partition_url` fills in the hash a config gives a stage.
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
JUDGMENTS_FILE = "judgments.parquet"
INDEX_FILE = "index.json"
FINETUNED_MODEL = "model"
OPENAI_MODEL_FILE = "openai_model.json"
# an evaluation's files (`editforge evaluate`), in eval_dir
EVAL = "eval"
EVAL_METRICS = "metrics.json"
EVAL_SAMPLES = "eval.parquet"
EVAL_PLOT = "eval.png"
EVAL_EXAMPLES = "examples.png"
# people's review of a render version (`editforge review`, `editforge calibrate-filter`), in review_dir
REVIEW = "review"
LABELS_DIR = "labels.parquet"  # a folder of parquet parts (pyarrow/pandas read it as one table)
CALIBRATION_FILE = "calibration.json"
FILTER_OVERRIDES_FILE = "filter.set"
PEOPLE_PLOT = "people_vs_filter.png"

# a run's name is part of its dashboard keys; Prefect allows lowercase letters, digits and dashes there
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
_NAME_RE = re.compile(NAME_PATTERN)
_HASH_RE = re.compile(r"^[0-9a-f]{16}$")  # a version folder (tasks.common.stage.config_hash)


def partition_name(partition_id: int) -> str:
    return f"part-{partition_id:05d}"


def stage_dir(output_root: str, stage: str, config_hash: str) -> str:
    """One version of a stage: everything it wrote under ``config_hash``."""
    return storage.url_join(output_root, stage, config_hash)


def versions(output_root: str, stage: str) -> list[str]:
    """The config hashes a stage has folders for under ``output_root`` (sorted)."""
    fs, path = storage.filesystem(storage.url_join(output_root, stage))
    if not fs.exists(path):
        return []
    names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    return sorted(n for n in names if _HASH_RE.match(n))


def partition_dir(output_root: str, stage: str, config_hash: str, partition_id: int) -> str:
    return storage.url_join(stage_dir(output_root, stage, config_hash), partition_name(partition_id))


def partition_relative(stage: str, config_hash: str, partition_id: int, name: str = "") -> str:
    """A partition (or a file in it) relative to the output root: what manifests record, so a run can move."""
    return storage.url_join(stage, config_hash, partition_name(partition_id), *([name] if name else []))


def partition_file(output_root: str, stage: str, config_hash: str, partition_id: int, name: str) -> str:
    return storage.url_join(partition_dir(output_root, stage, config_hash, partition_id), name)


def success_url(output_root: str, stage: str, config_hash: str, partition_id: int) -> str:
    return partition_file(output_root, stage, config_hash, partition_id, SUCCESS)


def progress_dir(run_dir: str, config_hash: str) -> str:
    """A partition's checkpoints, keyed by config hash: chunks of another config are never reused."""
    return storage.url_join(run_dir, PROGRESS, config_hash)


def lease_url(output_root: str, stage: str, config_hash: str, partition_id: int | str) -> str:
    """Who is working on a partition (outside it, so that nothing the partition holds is the lease);
    ``partition_id`` may be a name for a stage-wide step (the captions generations)."""
    name = partition_name(partition_id) if isinstance(partition_id, int) else partition_id
    return storage.url_join(stage_dir(output_root, stage, config_hash), "_leases", f"{name}.json")


def generations_dir(output_root: str, config_hash: str) -> str:
    """The captions ledger: one parquet (the captions taken) and one JSON (its record) per generation."""
    return storage.url_join(stage_dir(output_root, "captions", config_hash), "_generations")


def generation_url(output_root: str, config_hash: str, generation: int, ext: str) -> str:
    return storage.url_join(generations_dir(output_root, config_hash), f"gen-{generation:05d}.{ext}")


def finetuned_model_dir(output_root: str, config_hash: str) -> str:
    return partition_file(output_root, "finetune", config_hash, 0, FINETUNED_MODEL)


def train_work_dir(output_root: str, weights_key: str) -> str:
    """Training's checkpoints, by weights key: shared by the versions that differ only in how they sample."""
    return storage.url_join(output_root, "train", "_work", weights_key)


def eval_dir(output_root: str, eval_hash: str) -> str:
    """`eval/<hash>/`: one evaluation (its hash covers the model, the held-out shards, CLIP and the settings)."""
    return stage_dir(output_root, EVAL, eval_hash)


def index_url(output_root: str, pack_hash: str) -> str:
    """`pack/<hash>/index.json`: the shards of every pack partition of that version."""
    return storage.url_join(stage_dir(output_root, "pack", pack_hash), INDEX_FILE)


def report_dir(output_root: str, pack_hash: str) -> str:
    """`report/<pack hash>/`: the run's `report.html` and its PNGs (`editforge report --html`)."""
    return storage.url_join(output_root, "report", pack_hash)


def review_dir(output_root: str, render_hash: str) -> str:
    """`review/<render hash>/`: labels and calibrations of the pairs one render version drew (the images are
    that version's, so a label never meets another version's pair)."""
    return storage.url_join(output_root, REVIEW, render_hash)


def labels_dir(output_root: str, render_hash: str) -> str:
    """`review/<render hash>/labels.parquet/`: one parquet part per writing session, never rewritten by another."""
    return storage.url_join(review_dir(output_root, render_hash), LABELS_DIR)


def sample_key(caption_id: str, seed: int, branch: int | None = None) -> str:
    """WebDataset-safe key (no dots): `{caption_id}_{seed}`; a p branch (render.p_branches > 1):
    `{caption_id}_{seed}-{branch}` (still one `_`-separated tail: the triplet is the key before it)."""
    return f"{caption_id}_{seed}" if branch is None else f"{caption_id}_{seed}-{branch}"


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


def artifact_key(name: str, topic: str, config_hash: str) -> str:
    """The dashboard key of a run's artifact: `editforge-<name>-<topic>-<hash>` (topic: a stage name or
    `summary`; the hash: the stage's, or the run's for the summary), so an experiment's history is its own."""
    return f"editforge-{check_name(name)}-{topic}-{config_hash[:8]}"
