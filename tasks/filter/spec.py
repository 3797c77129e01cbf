"""The filter stage's record (see :mod:`tasks.common.stage`).

Its hash covers the effective selection (``filter.*`` over ``render.keep``) of the ladder's rungs that are
on, not the raw section: setting a field to the value it inherits, or a threshold of a rung that is off,
changes nothing. With the VLM judge on it also reads the judge stage (its scores), whose hash is then
part of this one's.
"""

from tasks.common.layout import KEPT_FILE
from tasks.common.stage import Dashboard, Resources, Stage
from tasks.judge.spec import STAGE as JUDGE
from tasks.render.spec import STAGE as RENDER


def selection_inputs(cfg) -> dict:
    from tasks.common.selection import selection_fields

    rungs = cfg.judges.rungs()
    return {
        "filter": {**selection_fields(cfg.selection(), rungs), "note": cfg.filter.note},
        "rungs": list(rungs),
    }


STAGE = Stage(
    name="filter",
    entry="tasks.filter.stage:run",
    summary="re-select the kept pairs from the stored scores (CLIP, DINOv2, SSIM, VLM thresholds; top-k), "
    "no re-rendering or re-judging",
    reads=(RENDER,),
    reads_when=lambda cfg: (JUDGE,) if cfg.judges.vlm.enabled else (),
    hashes=(),
    hash_extra=selection_inputs,
    outputs=(KEPT_FILE,),
    resources=lambda cfg: Resources(1, 0, "-", "re-selection from samples.parquet (+ judgments.parquet)"),
    dashboard=Dashboard(
        headline=(
            "n_triplets_in",
            "n_triplets_kept",
            "pass_rate_clip",
            "pass_rate_dino",
            "pass_rate_ssim",
            "pass_rate_vlm",
            "vlm_cost_per_kept_pair_usd",
            "median_kept_clip_sim_dir",
        ),
        run_pass_rate=("out", "in"),
        keeps_pairs=True,
    ),
)
