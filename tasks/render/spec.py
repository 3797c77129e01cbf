"""The render stage's record (see :mod:`tasks.common.stage`).

Its hash covers ``render`` (the render-time selection ``render.keep`` of the rungs render applies: the
VLM judge's threshold and those of image rungs that are off are left out), the models, and the image
rungs that are on (``judges.dino`` with ``models.dino*``, ``judges.ssim``).
"""

from tasks.common.layout import SAMPLES_FILE
from tasks.common.stage import Dashboard, Resources, Stage, Throughput, gpus_for
from tasks.text.spec import TEXT
from tasks.world.weights import hash_extra as world_models


def resources(cfg) -> Resources:
    r = cfg.render
    batch = "auto (free GPU memory)" if r.batch_samples == "auto" else str(r.batch_samples)
    images = 4 if r.guidance == "cfg" else 2
    judges = "".join(f" + {name}" for name in cfg.judges.image_rungs())
    return Resources(
        1,
        gpus_for(r.device),
        f"{batch} samples per UNet call (x{images} images)",
        f"{cfg.models.diffusion} + CLIP {cfg.models.clip}{judges}, {r.dtype}",
    )


def sections(cfg) -> tuple[str, ...]:
    base = ("models.diffusion", "models.diffusion_path", "models.vae_path", "models.clip", "models.clip_path")
    rungs = cfg.judges.image_rungs()
    return (
        *base,
        *(("models.dino", "models.dino_path", "judges.dino") if "dino" in rungs else ()),
        *(("judges.ssim",) if "ssim" in rungs else ()),
    )


def live(figures: dict) -> list[str]:
    """The live one-line description of a partition from :class:`tasks.render.stage.LiveFigures`."""
    rate = figures.get("pass_rate")
    return [
        f"{figures['triplets_done']}/{figures['triplets']} triplets",
        f"{figures['samples']} samples",
        f"pass rate {rate:.1%}" if rate is not None else "",
        f"{figures['kept_so_far']} pairs kept so far",
        f"{figures['unet_calls_per_kept_pair']} UNet calls/kept pair"
        if figures.get("unet_calls_per_kept_pair")
        else "",
        f"{figures['samples_per_s']} samples/s" if figures.get("samples_per_s") else "",
    ]


def render_inputs(cfg) -> dict:
    from tasks.common.selection import selection_fields

    rungs = ("clip", *cfg.judges.image_rungs())
    return {
        "render": {
            **cfg.render.output_fields(drop=("keep",)),
            "keep": selection_fields(cfg.render.keep, rungs),
        },
        "rungs": list(rungs),
        **world_models(cfg, ("diffusion", "clip")),
    }  # a rebuilt world model: a new version


STAGE = Stage(
    name="render",
    entry="tasks.render.stage:run",
    summary="Prompt-to-Prompt pairs per triplet, CLIP-scored in the same pass (+ the DINOv2/SSIM rungs); top-k kept",
    reads=(TEXT,),
    hashes=sections,
    hash_extra=render_inputs,
    outputs=(SAMPLES_FILE, "images/<key>_{input,edited}.png"),
    resources=resources,
    retries=2,
    one_at_a_time=True,  # one partition at a time on the worker's GPU; workers split partitions
    progress=True,
    dashboard=Dashboard(
        headline=(
            "pass_rate",
            "pass_rate_clip",
            "pass_rate_dino",
            "pass_rate_ssim",
            "n_samples",
            "n_passed",
            "n_triplets_with_kept_pair",
            "unet_calls_per_kept_pair",
            "samples_per_s",
            "pass_rate_clip_sim_dir",
            "pass_rate_clip_sim_image",
            "pass_rate_clip_sim_0",
            "pass_rate_clip_sim_1",
            "median_clip_sim_dir",
            "median_clip_sim_image",
        ),
        speed=("samples_per_s",),
        pass_rate="pass_rate",
        run_pass_rate=("n_passed", "n_samples"),
        pass_rate_label="passed / samples drawn",
        keeps_pairs=True,
        throughput=Throughput("n_unet_calls", "UNet calls/s", "samples_per_s", "samples/s in flight"),
        live=live,
        in_flight=("samples", "pass_rate", "kept_so_far", "samples_per_s"),
    ),
)
