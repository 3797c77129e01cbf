"""The pack stage's record (see :mod:`tasks.common.stage`)."""

from tasks.captions.spec import STAGE as CAPTIONS
from tasks.common.stage import Dashboard, Resources, Stage
from tasks.filter.spec import STAGE as FILTER
from tasks.render.spec import STAGE as RENDER

STAGE = Stage(
    name="pack",
    entry="tasks.pack.stage:run",
    summary="kept pairs as WebDataset shards (+ Hugging Face parquet); the run's shard index",
    reads=(FILTER, RENDER, CAPTIONS),  # kept.parquet, the kept pairs' images, the captions' metadata
    hashes=("pack",),
    outputs=("{train,val}-NNNNNN.tar", "hf/{train,val}-NNNNNN.parquet (pack.hf_export)"),
    resources=lambda cfg: Resources(
        1, 0, f"{cfg.pack.shard_max_samples} samples per shard", "JPEG/PNG encoding"
    ),
    finalize="tasks.pack.index:write_index",
    dashboard=Dashboard(headline=("n_train_samples", "n_val_samples", "n_shards"), keeps_pairs=True),
)
