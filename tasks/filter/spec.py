"""The filter stage's record (see :mod:`tasks.common.stage`).

Its hash covers the effective selection (``filter.*`` over ``render.keep``), not the raw section:
setting a field to the value it inherits changes nothing.
"""

from tasks.common.layout import KEPT_FILE
from tasks.common.stage import Resources, Stage

STAGE = Stage(
    name="filter",
    entry="tasks.filter.stage:run",
    summary="re-select the kept pairs from samples.parquet (thresholds, top-k), no re-rendering",
    reads=("render",),
    hashes=(),
    hash_extra=lambda cfg: {"filter": {**cfg.selection().model_dump(), "note": cfg.filter.note}},
    outputs=(KEPT_FILE,),
    resources=lambda cfg: Resources(1, 0, "-", "re-selection from samples.parquet"),
    headline=("n_triplets_in", "n_triplets_kept", "median_kept_clip_sim_dir"),
)
