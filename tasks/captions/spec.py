"""The captions stage's record (see :mod:`tasks.common.stage`)."""

from tasks.common.layout import CAPTIONS_FILE
from tasks.common.stage import Resources, Stage

STAGE = Stage(
    name="captions",
    entry="tasks.captions.stage:run",
    summary="LAION rows: filter, global dedup, seeded sample, split into partitions",
    reads=(),
    hashes=("captions",),
    outputs=(CAPTIONS_FILE,),
    resources=lambda cfg: Resources(1, 0, "-", "streams parquet; one global plan"),
    prepare="tasks.captions.stage:prepare",
)
