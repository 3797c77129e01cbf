"""The render stage's record (see :mod:`tasks.common.stage`)."""

from tasks.common.layout import SAMPLES_FILE
from tasks.common.stage import Resources, Stage, gpus_for
from tasks.world.weights import hash_extra as world_models


def resources(cfg) -> Resources:
    r = cfg.render
    batch = "auto (free GPU memory)" if r.batch_samples == "auto" else str(r.batch_samples)
    images = 4 if r.guidance == "cfg" else 2
    return Resources(1, gpus_for(r.device), f"{batch} samples per UNet call (x{images} images)",
                     f"{cfg.models.diffusion} + CLIP {cfg.models.clip}, {r.dtype}")


STAGE = Stage(
    name="render",
    entry="tasks.render.stage:run",
    summary="Prompt-to-Prompt pairs per triplet, CLIP-scored in the same pass; top-k kept",
    reads=("text",),
    hashes=("render", "models.diffusion", "models.diffusion_path", "models.vae_path", "models.clip", "models.clip_path"),
    hash_extra=lambda cfg: world_models(cfg, ("diffusion", "clip")),  # a rebuilt world model: a new version
    outputs=(SAMPLES_FILE, "images/<key>_{input,edited}.png"),
    resources=resources,
    retries=2,
    one_at_a_time=True,  # one partition at a time on the worker's GPU; workers split partitions
    progress=True,
    headline=("pass_rate", "n_samples", "n_passed", "n_triplets_with_kept_pair", "unet_calls_per_kept_pair",
              "samples_per_s", "pass_rate_clip_sim_dir", "pass_rate_clip_sim_image", "pass_rate_clip_sim_0",
              "pass_rate_clip_sim_1", "median_clip_sim_dir", "median_clip_sim_image"),
)
