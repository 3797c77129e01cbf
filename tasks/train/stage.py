"""The training stage under the stage contract: `{output_root}/train/part-00000/`.

    model/             StableDiffusionInstructPix2PixPipeline folder (safetensors)
    metrics.json       per-step loss, lr, epoch, samples seen; the run's summary
    sample_edit.png    input | target | model edit, on the first val example (text 7.5 / image 1.5 guidance)
    checkpoints/       accelerate states (newest `checkpoints_total_limit`), for resuming
    _SUCCESS.json      the contract's manifest (config hash, sha256 of outputs, summary, loss curve)

Training is not part of the generation chain's `stage_hash`: `train_hash` covers the `train` section
(minus operational knobs), the diffusion model and the shards of `index.json` (whose own hash covers
the chain up to pack). Checkpoints are keyed by `weights_key` — the same without the sample-edit
settings — so changing only those re-samples from the final checkpoint without re-training.

`accelerate` checkpoints need a local folder: for an object-store `output_root` the run trains in
`$EDITFORGE_CACHE/train-work/<key>/` (resumable on the same machine) and uploads the outputs at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from tasks.common import storage
from tasks.common.config import PipelineConfig, TrainConfig
from tasks.common.contract import PartitionRun, execute_partition
from tasks.common.tiny import cache_root

STAGE = "train"
MAX_CURVE_POINTS = 200


def _train_fields(cfg: TrainConfig, drop: tuple[str, ...]) -> dict[str, Any]:
    data = cfg.model_dump(mode="json")
    for key in drop:
        data.pop(key, None)
    return data


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def weights_key(cfg: PipelineConfig, index: dict[str, Any]) -> str:
    """Hash of everything that determines the trained weights (keys the checkpoints)."""
    return _hash({
        "stage": STAGE, "train": _train_fields(cfg.train, TrainConfig.OPERATIONAL + TrainConfig.SAMPLING),
        "models.diffusion": cfg.models.diffusion, "models.diffusion_path": cfg.models.diffusion_path,
        "train_shards": index["splits"]["train"]["shards"], "data": index.get("config_hash"),
    })


def train_hash(cfg: PipelineConfig, index: dict[str, Any]) -> str:
    """The stage's config hash for `_SUCCESS.json`: the weights plus the sample-edit settings and val shards."""
    return _hash({"weights": weights_key(cfg, index), "sampling": {k: getattr(cfg.train, k) for k in TrainConfig.SAMPLING},
                  "val_shards": index["splits"].get("val", {}).get("shards", [])})


def loss_curve(history: list[dict[str, Any]], max_points: int = MAX_CURVE_POINTS) -> list[dict[str, Any]]:
    """At most `max_points` rows (step, mean loss over the bucket, lr) for the dashboard table."""
    if not history:
        return []
    size = -(-len(history) // max_points)
    rows = []
    for start in range(0, len(history), size):
        chunk = history[start: start + size]
        rows.append({"step": chunk[-1]["step"], "loss": round(sum(h["loss"] for h in chunk) / len(chunk), 6),
                     "lr": chunk[-1]["lr"], "epoch": chunk[-1]["epoch"]})
    return rows


def default_index_url(cfg: PipelineConfig) -> str:
    return storage.url_join(cfg.output_root, "pack", "index.json")


def read_index(index_url: str) -> dict[str, Any]:
    if not storage.exists(index_url):
        raise FileNotFoundError(f"no shard index at {index_url}: run the generate flow first "
                                "(python -m flows.generate --preset ...) or pass the index of existing shards")
    index = storage.read_json(index_url)
    if not index.get("splits", {}).get("train", {}).get("shards"):
        raise ValueError(f"{index_url}: the train split has no shards")
    return index


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _sample_edit(cfg: TrainConfig, model_dir: Path, urls: list[str], dest: Path) -> dict[str, Any]:
    """Edit the first example of `urls` with the trained model; save input | target | edit as a PNG."""
    from tasks.train.data import center_pair, read_examples
    from tasks.train.infer import edit_image, side_by_side
    from tasks.train.model import load_pipeline

    example = center_pair(read_examples(urls, 1)[0], cfg.resolution)
    pipe = load_pipeline(model_dir, device=_device(cfg.device))
    edited = edit_image(pipe, example.original, example.instruction, guidance_scale=cfg.guidance_scale,
                        image_guidance_scale=cfg.image_guidance_scale, steps=cfg.sample_steps, seed=cfg.seed)
    side_by_side(example.original, example.edited, edited).save(dest)
    return {"key": example.key, "instruction": example.instruction, "guidance_scale": cfg.guidance_scale,
            "image_guidance_scale": cfg.image_guidance_scale, "steps": cfg.sample_steps}


def run_train(cfg: PipelineConfig, index_url: str | None = None, logger: logging.Logger | None = None,
              on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the editing model on the shards of `index_url` (default `{output_root}/pack/index.json`)."""
    from tasks.train.loop import train_editing_model

    index_url = index_url or default_index_url(cfg)
    index = read_index(index_url)
    train_urls = list(index["splits"]["train"]["shards"])
    val_urls = list(index["splits"].get("val", {}).get("shards", [])) or train_urls
    key = weights_key(cfg, index)

    def work(run: PartitionRun) -> None:
        local = isinstance(storage.filesystem(run.dir)[0], LocalFileSystem)
        workdir = Path(run.dir) if local else cache_root() / "train-work" / key
        result = train_editing_model(cfg.train, cfg.models, train_urls, workdir, run_key=key, logger=logger,
                                     on_step=on_step)
        summary = result.summary()
        (workdir / "metrics.json").write_text(json.dumps({"summary": summary, "history": result.history}, indent=1))
        sample = _sample_edit(cfg.train, result.model_dir, val_urls, workdir / "sample_edit.png")
        names = sorted(p.relative_to(workdir).as_posix() for p in result.model_dir.rglob("*") if p.is_file())
        names += ["metrics.json", "sample_edit.png"]
        for name in names:
            if not local:
                storage.write_bytes_atomic(run.path(name), (workdir / name).read_bytes())
            run.output(name)
        run.stats.add("in", int(index["splits"]["train"].get("samples", 0)))
        run.stats.add("steps", result.steps)
        run.stats.add("samples_seen", summary["samples_seen"])
        run.stats.observe("loss", [h["loss"] for h in result.history])
        run.stats.timings["train"] = result.wall_time_s
        run.extra.update({"index": index_url, "model_dir": run.path("model"), "weights_key": key, "train": summary,
                          "loss_curve": loss_curve(result.history), "sample": {**sample, "png": run.path("sample_edit.png")}})

    return execute_partition(STAGE, 0, cfg.output_root, train_hash(cfg, index), work, logger)
