"""The judge stage's record (see :mod:`tasks.common.stage`): the VLM rung of the judge ladder.

Between render and filter. Its hash covers ``judges.vlm`` (model, server, rubric settings, image
encoding, sampling; not the operational client settings, the mode or the price table), the rubric's
templates and render's hash; thresholds are not in it (the filter re-selects with them). With the VLM
judge off the stage writes an empty ``judgments.parquet`` per partition and asks nothing.
"""

from tasks.common.layout import JUDGMENTS_FILE
from tasks.common.stage import Dashboard, Resources, Stage
from tasks.render.spec import STAGE as RENDER


def sections(cfg) -> tuple[str, ...]:
    return ("judges.vlm",) if cfg.judges.vlm.enabled else ()


def inputs(cfg) -> dict:
    if not cfg.judges.vlm.enabled:
        return {"vlm": "off"}
    from prompts.templates import judge_templates_hash

    return {"rubric_templates": judge_templates_hash()}


def resources(cfg) -> Resources:
    v = cfg.judges.vlm
    if not v.enabled:
        return Resources(1, 0, "-", "VLM judge off (judges.vlm.enabled): nothing asked")
    where = "served on the worker's GPU" if v.gpus else "OpenAI-compatible API"
    return Resources(1, v.gpus, f"{v.concurrency} requests in flight", f"{v.model}, {where} ({v.mode} mode)")


STAGE = Stage(
    name="judge",
    entry="tasks.judge.stage:run",
    summary="the VLM rung: a vision-language judge grades render's candidates with a VIEScore-like rubric",
    reads=(RENDER,),
    hashes=sections,
    hash_extra=inputs,
    outputs=(JUDGMENTS_FILE,),
    resources=resources,
    retries=2,
    one_at_a_time=True,  # the API quota (or the worker's GPU serving the judge) is shared
    progress=True,
    dashboard=Dashboard(run_pass_rate=("out", "in")),
)
