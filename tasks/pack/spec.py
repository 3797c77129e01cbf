"""The pack stage's record (see :mod:`tasks.common.stage`)."""

from tasks.common.stage import Resources, Stage

STAGE = Stage(
    name="pack",
    entry="tasks.pack.shards:run",
    summary="kept pairs as WebDataset shards (+ Hugging Face parquet); the run's shard index",
    reads=("filter", "render", "captions"),  # kept.parquet, the kept pairs' images, the captions' metadata
    hashes=("pack",),
    outputs=("{train,val}-NNNNNN.tar", "hf/{train,val}-NNNNNN.parquet (pack.hf_export)"),
    resources=lambda cfg: Resources(1, 0, f"{cfg.pack.shard_max_samples} samples per shard", "JPEG/PNG encoding"),
    finalize="tasks.pack.index:write_index",
    headline=("n_train_samples", "n_val_samples", "n_shards"),
)
