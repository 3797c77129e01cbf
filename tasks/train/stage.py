"""The training stage under the stage contract: `{output_root}/train/<hash>/part-00000/`.

Writes ``model/`` (an InstructPix2Pix pipeline folder), ``metrics.json``, ``sample_edit.png`` and the
manifest. Its hash covers the ``train`` section, the diffusion model and the shards it trains on;
checkpoints are keyed by ``weights_key`` in ``train/_work/`` so that changing only the sample-edit settings
re-samples without re-training. With several processes it launches them (:mod:`tasks.train.launch`) and
waits, holding the lease; ``join`` is what another node runs.

The files, the hash and the work folder in full: docs/training.md ("In the code").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from tasks.common import layout, storage
from tasks.common.config import PipelineConfig, TrainConfig
from tasks.common.contract import MissingInputError, PartitionRun, figures, finished
from tasks.common.devices import torch_device
from tasks.common.errors import InputError
from tasks.common.stage import execute, stage_hash
from tasks.common.tiny import cache_root
from tasks.pack.index import index_url as own_index_url
from tasks.pack.index import read_index
from tasks.pack.spec import STAGE as PACK
from tasks.train.spec import STAGE as TRAIN

STAGE = "train"
MAX_CURVE_POINTS = 200


def _pack_hash(index: dict[str, Any]) -> dict[str, str]:
    """The index's own pack hash stands for the chain that wrote the shards (upstream of the hash)."""
    return {"pack": index.get("config_hash")}


def _shards(index: dict[str, Any]) -> dict[str, list[str]]:
    return {
        "train_shards": index["splits"]["train"]["shards"],
        "val_shards": index["splits"].get("val", {}).get("shards", []),
    }


def weights_key(cfg: PipelineConfig, index: dict[str, Any]) -> str:
    """Hash of everything that determines the trained weights (keys the checkpoints)."""
    return stage_hash(
        cfg,
        TRAIN,
        upstream=_pack_hash(index),
        extra={
            "train": cfg.train.output_fields(drop=TrainConfig.SAMPLING),
            "train_shards": _shards(index)["train_shards"],
        },
    )


def train_hash(cfg: PipelineConfig, index: dict[str, Any]) -> str:
    """The stage's config hash for `_SUCCESS.json`: the weights plus the sample-edit settings and val shards."""
    return stage_hash(cfg, TRAIN, upstream=_pack_hash(index), extra=_shards(index))


class NoTrainedModelError(MissingInputError):
    """The training flow has not finished a model for this config (and index) yet."""


def trained_model(
    cfg: PipelineConfig, index_url: str | None = None, args: str = "--preset <preset>"
) -> tuple[str, str]:
    """(model folder, train hash) of the model the training flow finished for this config, on `index_url`
    (default: the run's own index), or NoTrainedModelError naming the command to run (`args`: the preset
    and overrides to repeat in it)."""
    own = index_url is None
    url = index_url or own_index_url(cfg)
    train_cmd = f"editforge train {args}" + ("" if own else f" --index {index_url}")
    if not storage.exists(url):
        if own:
            raise NoTrainedModelError(
                f"no trained model for this config: it has no shards yet ({url} is missing); "
                f"run `editforge run {args}`, then `{train_cmd}`"
            )
        raise NoTrainedModelError(f"no shard index at {url}: no model can have been trained on it")
    config_hash = train_hash(cfg, read_index(url, resolved=False))
    folder = layout.partition_dir(cfg.output_root, STAGE, config_hash, 0)
    done = finished(folder, config_hash)
    if not done or not figures(done).get("model_dir"):
        raise NoTrainedModelError(
            f"no trained model for this config yet ({folder} holds no finished training); "
            f"run `{train_cmd}` first, or pass --model PATH"
        )
    return storage.url_join(cfg.output_root, figures(done)["model_dir"]), config_hash


def loss_curve(history: list[dict[str, Any]], max_points: int = MAX_CURVE_POINTS) -> list[dict[str, Any]]:
    """At most `max_points` rows (step, mean loss over the bucket, lr) for the dashboard table."""
    if not history:
        return []
    size = -(-len(history) // max_points)
    rows = []
    for start in range(0, len(history), size):
        chunk = history[start : start + size]
        rows.append(
            {
                "step": chunk[-1]["step"],
                "loss": round(sum(h["loss"] for h in chunk) / len(chunk), 6),
                "lr": chunk[-1]["lr"],
                "epoch": chunk[-1]["epoch"],
            }
        )
    return rows


def _sample_edit(cfg: TrainConfig, model_dir: Path, urls: list[str], dest: Path) -> dict[str, Any]:
    """Edit the first example of `urls` with the trained model; save input | target | edit as a PNG."""
    from tasks.train.data import center_pair, read_examples
    from tasks.train.infer import edit_image, side_by_side
    from tasks.train.model import load_pipeline

    example = center_pair(read_examples(urls, 1)[0], cfg.resolution)
    pipe = load_pipeline(model_dir, device=torch_device(cfg.device, "train.device"))
    edited = edit_image(
        pipe,
        example.original,
        example.instruction,
        guidance_scale=cfg.guidance_scale,
        image_guidance_scale=cfg.image_guidance_scale,
        steps=cfg.sample_steps,
        seed=cfg.seed,
    )
    side_by_side(example.original, example.edited, edited).save(dest)
    return {
        "key": example.key,
        "instruction": example.instruction,
        "guidance_scale": cfg.guidance_scale,
        "image_guidance_scale": cfg.image_guidance_scale,
        "steps": cfg.sample_steps,
    }


@dataclass(frozen=True)
class _Inputs:
    own: bool  # the run's own index (not --index)
    index_url: str
    index: dict[str, Any]  # as stored: what the hashes cover
    train_urls: list[str]
    val_urls: list[str]
    key: str  # weights key
    local: bool  # output_root is a local folder
    workdir: Path


def _inputs(cfg: PipelineConfig, index_url: str | None) -> _Inputs:
    own = index_url is None
    index_url = index_url or own_index_url(cfg)
    index = read_index(index_url, resolved=False)
    if own and index.get("config_hash") != stage_hash(cfg, PACK):
        raise MissingInputError(
            f"train reads {index_url}, which the pack stage wrote under another config (hash "
            f"{index.get('config_hash')}, this config expects {stage_hash(cfg, PACK)}): run the pack stage "
            "(editforge run) for this config first, or pass its index explicitly to train on those shards"
        )
    urls = read_index(index_url)["splits"]
    train_urls = list(urls["train"]["shards"])
    val_urls = list(urls.get("val", {}).get("shards", [])) or train_urls
    key = weights_key(cfg, index)
    local = isinstance(storage.filesystem(cfg.output_root)[0], LocalFileSystem)
    # checkpoints live by weights key, beside the versions: a new sample-edit setting (a new version)
    # resumes from the final checkpoint instead of training again
    workdir = (
        Path(layout.train_work_dir(cfg.output_root, key)) if local else cache_root() / "train-work" / key
    )
    return _Inputs(own, index_url, index, train_urls, val_urls, key, local, workdir)


def _train(
    cfg: PipelineConfig,
    inputs: _Inputs,
    logger: logging.Logger | None,
    on_step: Callable[[dict[str, Any]], None] | None,
):
    """One process: in this one; more: launched on this node (node 0) and waited for."""
    from tasks.train import launch

    if launch.check(cfg.train) == 1:
        from tasks.train.loop import train_editing_model

        return train_editing_model(
            cfg.train,
            cfg.models,
            inputs.train_urls,
            inputs.workdir,
            run_key=inputs.key,
            logger=logger,
            on_step=on_step,
        )
    launch.run_workers(cfg.train, cfg.models, inputs.train_urls, inputs.workdir, inputs.key, 0, logger)
    return launch.read_result(inputs.workdir)


def join(
    cfg: PipelineConfig, node_rank: int, *, index_url: str | None = None, logger: logging.Logger | None = None
) -> None:
    """Node `node_rank` (>= 1) of a multi-node training: launch this node's workers on the same inputs and work
    folder as node 0's flow run, and wait; no lease, no contract (node 0 writes the outputs)."""
    from tasks.train import launch

    if not 1 <= node_rank < cfg.train.nodes:
        raise InputError(
            f"--node-rank {node_rank}: the nodes of train.nodes={cfg.train.nodes} other than the flow's "
            f"node 0 are 1..{cfg.train.nodes - 1}"
        )
    launch.check(cfg.train)
    inputs = _inputs(cfg, index_url)
    launch.run_workers(
        cfg.train, cfg.models, inputs.train_urls, inputs.workdir, inputs.key, node_rank, logger
    )


def run(
    cfg: PipelineConfig,
    partition_id: int = 0,
    *,
    index_url: str | None = None,
    logger: logging.Logger | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train the editing model on the shards of `index_url` (default `{output_root}/pack/<hash>/index.json`)."""
    inputs = _inputs(cfg, index_url)
    own, index_url, index, key, local = inputs.own, inputs.index_url, inputs.index, inputs.key, inputs.local
    val_urls, workdir = inputs.val_urls, inputs.workdir

    def work(run: PartitionRun) -> None:
        result = _train(cfg, inputs, logger, on_step)
        summary = result.summary()
        (workdir / "metrics.json").write_text(
            json.dumps({"summary": summary, "history": result.history}, indent=1)
        )
        sample = _sample_edit(cfg.train, result.model_dir, val_urls, workdir / "sample_edit.png")
        names = sorted(p.relative_to(workdir).as_posix() for p in result.model_dir.rglob("*") if p.is_file())
        names += ["metrics.json", "sample_edit.png"]
        for name in names:
            if local:
                storage.move(str(workdir / name), run.path(name))
            else:
                storage.write_bytes_atomic(run.path(name), (workdir / name).read_bytes())
            run.output(name)
        run.stats.add("in", int(index["splits"]["train"].get("samples", 0)))
        run.stats.add("steps", result.steps)
        run.stats.add("samples_seen", summary["samples_seen"])
        run.stats.observe("loss", [h["loss"] for h in result.history])
        run.stats.timings["train"] = result.wall_time_s
        run.figures.update(
            {
                "index": storage.url_join("pack", stage_hash(cfg, PACK), layout.INDEX_FILE)
                if own
                else index_url,
                "model_dir": run.relative("model"),
                "weights_key": key,
                "train": summary,
                "loss_curve": loss_curve(result.history),
                "sample": {**sample, "png": run.relative("sample_edit.png")},
            }
        )

    # the index was checked above; its shards, not pack's partitions, are what training reads
    return execute(
        cfg,
        TRAIN,
        partition_id,
        work,
        logger,
        upstream=_pack_hash(index),
        extra=_shards(index),
        check_upstream=False,
    )
