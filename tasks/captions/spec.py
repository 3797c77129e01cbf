"""The captions stage's record (see :mod:`tasks.common.stage`).

Its hash covers how captions are read and sampled, not how many or from which files: the ledger
(:mod:`tasks.captions.generations`) records what each generation took, so a grown source or a higher
``captions.num_captions`` appends partitions to the same version instead of starting a new one.
"""

from tasks.common.layout import CAPTIONS_FILE
from tasks.common.stage import Resources, Stage

# what decides which generations exist, not what a partition of a generation holds
GROWTH = ("source", "num_captions", "num_partitions")


def sections(cfg) -> tuple[str, ...]:
    return tuple(f"captions.{name}" for name in type(cfg.captions).model_fields if name not in GROWTH)


STAGE = Stage(
    name="captions",
    entry="tasks.captions.stage:run",
    summary="LAION rows: filter, global dedup, seeded sample into the append-only ledger, split into partitions",
    reads=(),
    hashes=sections,
    outputs=(CAPTIONS_FILE,),
    resources=lambda cfg: Resources(1, 0, "-", "streams parquet; one ledger per version"),
    prepare="tasks.captions.stage:prepare",
)
