"""The training stage's record (see :mod:`tasks.common.stage`): its own flow, not part of the chain.

Its hash covers the ``train`` section, the diffusion model and the shards it trains on, which come
from the index it is given (the run's ``pack/<hash>/index.json`` by default): see :mod:`tasks.train.stage`.
"""

from tasks.common.stage import Resources, Stage, gpus_for
from tasks.world.weights import hash_extra as world_models


def resources(cfg) -> Resources:
    t = cfg.train
    procs = t.processes if t.processes != "auto" else None
    gpus = gpus_for(t.device) * (procs or 1)
    per_node = f"{procs} process(es)" if procs else "a process per visible GPU (processes: auto)"
    return Resources(1, gpus, f"total {t.total_batch_size} = {t.batch_size} per process x accumulation x processes",
                     f"{per_node} x {t.nodes} node(s), launched by the flow (torchrun)")


STAGE = Stage(
    name="train",
    entry="tasks.train.stage:run",
    summary="the InstructPix2Pix editing model (8-channel conv_in) on the shards",
    reads=("pack",),
    hashes=("train", "models.diffusion", "models.diffusion_path", "models.vae_path"),
    hash_extra=lambda cfg: world_models(cfg, ("diffusion",)),
    outputs=("model/", "metrics.json", "sample_edit.png"),
    resources=resources,
    partitions="one",
    in_chain=False,
)
