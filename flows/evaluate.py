"""The evaluation flow (paper Fig. 8 / 10): the editing model on held-out samples, image guidance swept.

    train/<hash>/part-00000/model/ (or --model PATH) ──┐
    pack/<hash>/index.json, split val (--limit N) ─────┴─► evaluate (edit at each s_I, CLIP-score) ─► eval/<hash>/
                                                                        metrics.json, eval.parquet, eval.png

    python -m flows.evaluate --preset demo [--model PATH] [--image-guidance 1.0,1.5,2.0] [--limit 50]   (= editforge evaluate)

Each image guidance scale s_I (default 1.0, 1.2, ..., 2.2) at text guidance 7.5 gives one point of the
paper's plot: the mean CLIP directional similarity (x) against the mean CLIP image similarity (y), scored
with the filter's CLIP model (`models.clip`) and metric functions. The folder's hash covers the model, the
held-out shards, CLIP and the settings (tasks/train/evaluate.py); a re-run with the same ones computes the
same numbers again into the same folder.
"""

from __future__ import annotations  # noqa: I001  (flows._env must be imported before prefect)

import flows._env  # noqa: F401  (must precede prefect)

import sys
from typing import Annotated, Any

import typer
from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common.errors import InputError
from flows.options import Debug, Overrides, Preset, load_or_exit, reported, run_command
from flows.stages import retry_unless_permanent
from tasks.common import layout
from tasks.common.config import PipelineConfig, load_config
from tasks.common.stage import Resources, gpus_for

DEFAULT_IMAGE_GUIDANCE = (
    "1.0,1.2,1.4,1.6,1.8,2.0,2.2"  # = tasks.train.evaluate.DEFAULT_IMAGE_GUIDANCE (torch-free here)
)


def settings_for(
    cfg: PipelineConfig,
    image_guidance: list[float] | str | None = None,
    text_guidance: float = 7.5,
    steps: int | None = None,
    seed: int = 0,
    resolution: int | None = None,
    limit: int = 100,
    split: str = "val",
):
    """The evaluation settings; steps and resolution default to the training flow's sample edit's
    (`train.sample_steps`, `train.resolution`)."""
    from tasks.train.evaluate import EvalSettings, parse_guidance_list

    if image_guidance is None or isinstance(image_guidance, str):
        image_guidance = parse_guidance_list(image_guidance or DEFAULT_IMAGE_GUIDANCE)
    return EvalSettings(
        image_guidance=tuple(image_guidance),
        text_guidance=text_guidance,
        steps=steps if steps is not None else cfg.train.sample_steps,
        seed=seed,
        resolution=resolution if resolution is not None else cfg.train.resolution,
        limit=limit,
        split=split,
    )


@task(name="evaluate-model", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def evaluate_task(
    cfg: PipelineConfig, plan: dict[str, Any], device: str | None, batch_size: int
) -> dict[str, Any]:
    from tasks.train.evaluate import evaluate as run_evaluation

    return run_evaluation(cfg, plan, device, batch_size, logger=get_run_logger())


def publish_evaluation(cfg: PipelineConfig, result: dict[str, Any]) -> None:
    """The metrics as a keyed table artifact (`editforge-<name>-eval-<hash>`) and a markdown report
    (`editforge-<name>-eval-report-<hash>`)."""
    from tasks.train.evaluate import scale_label

    digest, s = result["eval_hash"], result["settings"]
    rows = [
        {
            "image_guidance": r["image_guidance"],
            "text_guidance": r["text_guidance"],
            "clip_sim_image": round(r["clip_sim_image"], 4),
            "clip_sim_dir": round(r["clip_sim_dir"], 4),
            "clip_sim_1": round(r["clip_sim_1"], 4),
            "n": r["n"],
        }
        for r in result["metrics"]
    ]
    what = (
        f"{result['samples']} {s['split']} samples, text guidance {s['text_guidance']:g}, {s['steps']} steps, "
        f"seed {s['seed']}, {s['resolution']}px"
    )
    create_table_artifact(
        rows,
        key=layout.artifact_key(cfg.name, "eval", digest),
        description=f"EditForge `{cfg.name}` — evaluation of {result['model_dir']}: {what}",
    )
    lines = [
        f"# EditForge `{cfg.name}` — evaluation `{digest}`",
        "",
        f"Model `{result['model_dir']}`, {what}; CLIP `{cfg.models.clip_path or cfg.models.clip}` "
        f"(resize {cfg.render.clip_resize}).",
        "",
        "| image guidance | CLIP image similarity | CLIP direction similarity | CLIP edit vs output caption | n |",
        "|---|---|---|---|---|",
        *(
            f"| {scale_label(r['image_guidance'])} | {r['clip_sim_image']} | {r['clip_sim_dir']} | {r['clip_sim_1']} | {r['n']} |"
            for r in rows
        ),
        "",
        f"Plot (x: direction, y: image similarity, one point per image guidance): `{result['files']['plot']}`; "
        f"per sample: `{result['files']['samples']}`; metrics: `{result['files']['metrics']}`.",
    ]
    create_markdown_artifact(
        "\n".join(lines),
        key=layout.artifact_key(cfg.name, "eval-report", digest),
        description=f"EditForge `{cfg.name}` evaluation report",
    )


@flow(name="editforge-evaluate", log_prints=True)
def evaluate(
    preset: str = "demo",
    overrides: list[str] | None = None,
    model: str | None = None,
    index: str | None = None,
    split: str = "val",
    limit: int = 100,
    image_guidance: list[float] | None = None,
    text_guidance: float = 7.5,
    steps: int | None = None,
    seed: int = 0,
    resolution: int | None = None,
    device: str | None = None,
    batch_size: int = 8,
) -> dict:
    """Evaluate `model` (default: the config's trained model) on the held-out split of `index` (default: the
    run's shards); returns the small record (folder, files, per-scale metrics)."""
    from tasks.train.evaluate import command_args, plan_evaluation, scale_label

    cfg = load_config(preset, overrides or [])
    settings = settings_for(cfg, image_guidance, text_guidance, steps, seed, resolution, limit, split)
    plan = plan_evaluation(cfg, settings, model, index, command_args(preset, overrides))
    resources = Resources(1, gpus_for(device or cfg.train.device), f"{batch_size} edits per pipeline call")
    with tags(*resources.tags()):
        result = evaluate_task(cfg, plan, device, batch_size)
    publish_evaluation(cfg, result)
    print(
        f"evaluate: {result['samples']} {split} samples x {len(settings.image_guidance)} image guidance scales, "
        f"text guidance {settings.text_guidance:g}, {settings.steps} steps, {settings.resolution}px: "
        f"edits in {result['edit_s']} s"
    )
    for r in result["metrics"]:
        print(
            f"  image guidance {scale_label(r['image_guidance'])}: CLIP image similarity {r['clip_sim_image']:.4f}, "
            f"direction similarity {r['clip_sim_dir']:.4f} (n={r['n']})"
        )
    print(f"outputs: {result['dir']} ({', '.join(p.rsplit('/', 1)[-1] for p in result['files'].values())})")
    return result


def check_device(device: str) -> None:
    """A --device that names no device, or CUDA where none is visible: ValueError (exit 2)."""
    from tasks.common.devices import torch_device

    try:
        torch_device(device, "--device")
    except RuntimeError as err:
        raise InputError(f"--device {device}: {err}; use auto, cpu, cuda or cuda:N") from None


def evaluate_command(
    preset: Preset = "demo",
    overrides: Overrides = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="any diffusers (SDXL) InstructPix2Pix folder (default: the "
            "model `editforge train` finished for this config)"
        ),
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(
            help="index.json of the held-out shards (default: the run's "
            "pack/<hash>/index.json); without --model, the model trained on it"
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(help="the index's split to evaluate on: val (held out) or train")
    ] = "val",
    limit: Annotated[int, typer.Option(help="at most this many samples (the first in shard order)")] = 100,
    image_guidance: Annotated[
        str, typer.Option(help="image guidance scales to sweep, comma-separated")
    ] = DEFAULT_IMAGE_GUIDANCE,
    text_guidance: Annotated[float, typer.Option(help="text guidance scale")] = 7.5,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: train.sample_steps)")] = None,
    seed: Annotated[int, typer.Option(help="sample i is edited with seed + i")] = 0,
    resolution: Annotated[
        int | None, typer.Option(help="shorter side + centre crop of the inputs (default: train.resolution)")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda, cuda:N (default: train.device)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="edits per pipeline call")] = 8,
    debug: Debug = False,
) -> None:
    """Evaluate the editing model as the paper does: CLIP image vs direction similarity over image guidance."""
    cfg = load_or_exit(preset, overrides)
    with reported(debug):
        from tasks.train.evaluate import command_args, plan_evaluation

        if batch_size < 1:
            raise InputError(f"--batch-size {batch_size}: must be >= 1")
        settings = settings_for(cfg, image_guidance, text_guidance, steps, seed, resolution, limit, split)
        if device:
            check_device(device)
        plan_evaluation(
            cfg, settings, model, index, command_args(preset, overrides)
        )  # bad input: before Prefect
        evaluate(
            preset,
            overrides or [],
            model,
            index,
            split,
            limit,
            list(settings.image_guidance),
            text_guidance,
            steps,
            seed,
            resolution,
            device,
            batch_size,
        )


def main(argv: list[str] | None = None) -> int:
    return run_command(evaluate_command, argv, "python -m flows.evaluate", __doc__)


if __name__ == "__main__":
    sys.exit(main())
