"""The image rungs inside the render stage (tiny models): scored on the decoded images right after CLIP, each
only for the samples that passed the rungs below, counted by reason, and resumed to the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.common import storage
from tasks.common.config import load_config
from tasks.common.contract import Checkpoint
from tasks.common.layout import partition_dir
from tasks.common.selection import failure_reason, passes
from tasks.registry import partition_url, stage_hash
from tasks.render.renderer import Renderer
from tasks.render.stage import run as run_render

pytestmark = pytest.mark.component

TRIPLETS = pd.DataFrame(
    [
        {
            "caption_id": f"{i:016x}",
            "input": f"a photo of a cat number {i}",
            "edit": "make it a dog",
            "output": f"a photo of a dog number {i}",
            "status": "ok",
        }
        for i in range(4)
    ]
)


def config(root, *overrides):
    cfg = load_config(
        "demo",
        [
            f"output_root={root}",
            "render.steps=4",
            "render.adaptive.enabled=false",
            "render.early_reject.at=null",
            "render.samples_per_triplet=6",
            "render.save_images=passed",
            *overrides,
        ],
    )
    text = partition_dir(str(root), "text", stage_hash(cfg, "text"), 0)
    storage.write_parquet_atomic(f"{text}/triplets.parquet", TRIPLETS)
    storage.write_json_atomic(f"{text}/_SUCCESS.json", {"config_hash": stage_hash(cfg, "text")})
    return cfg


def samples(cfg) -> pd.DataFrame:
    return storage.read_parquet(f"{partition_url(cfg, 'render')}/samples.parquet")


@pytest.fixture(scope="module")
def renderer():
    return Renderer(load_config("demo"))


@pytest.fixture(scope="module")
def thresholds(tmp_path_factory, renderer) -> list[str]:
    """Thresholds at the medians of what these renders score, so that each rung rejects some."""
    cfg = config(
        tmp_path_factory.mktemp("open"),
        "render.keep.dino_threshold=-1",
        "render.keep.ssim_min=-1",
        "render.keep.ssim_max=1",
    )
    run_render(cfg, 0, renderer=renderer)
    df = samples(cfg)
    scored = df[df["ssim"].notna()]
    return [
        f"render.keep.dino_threshold={scored['dino_similarity'].quantile(0.3):.6f}",
        f"render.keep.ssim_min={scored['ssim'].quantile(0.2):.6f}",
        f"render.keep.ssim_max={scored['ssim'].quantile(0.9):.6f}",
    ]


def test_rungs_score_only_what_passed_below_and_count_rejections_by_reason(tmp_path, renderer, thresholds):
    cfg = config(tmp_path, *thresholds)
    manifest = run_render(cfg, 0, renderer=renderer)
    df = samples(cfg)
    keep, rungs = cfg.render.keep, ("clip", "dino", "ssim")
    clip_ok = passes(df, keep).to_numpy()
    assert clip_ok.any() and (~clip_ok).any()
    assert (df["dino_similarity"].notna().to_numpy() == clip_ok).all()  # DINOv2 scored the CLIP passers only
    dino_ok = clip_ok & (df["dino_similarity"] >= keep.dino_threshold).to_numpy()
    assert (df["ssim"].notna().to_numpy() == dino_ok).all()  # SSIM only what DINOv2 passed
    assert (df.loc[clip_ok, "dino_model"] == "tiny").all()
    assert df["passed"].equals(passes(df, keep, rungs))
    reasons = failure_reason(df, keep, rungs).value_counts().to_dict()
    assert {"dino_similarity", "ssim_low", "ssim_high"} <= set(reasons)
    assert {k: manifest["rejected"][k] for k in reasons} == reasons
    c = manifest["counts"]
    assert (
        c["ladder_clip_in"],
        c["ladder_clip_passed"],
        c["ladder_dino_passed"],
        c["ladder_ssim_passed"],
    ) == (len(df), int(clip_ok.sum()), int(dino_ok.sum()), int(df["passed"].sum()))
    judges = manifest["figures"]["judges"]
    assert judges["dino"] == "tiny" and "torchmetrics" in judges["ssim"]
    assert df["image_stored"].equals(df["passed"])  # save_images=passed: every pair through the ladder
    assert {"dino_similarity", "ssim"} <= set(manifest["quantiles"])


def test_a_render_with_rungs_resumes_to_the_same_bytes(tmp_path, renderer, thresholds, monkeypatch):
    clean = config(tmp_path / "clean", *thresholds)
    run_render(clean, 0, renderer=renderer)
    cfg = config(tmp_path / "crashed", *thresholds)
    append, calls = Checkpoint.append, []

    def dying_append(self, batch_id, df):
        calls.append(batch_id)
        if len(calls) > 2:
            raise KeyboardInterrupt("killed")
        append(self, batch_id, df)

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "append", dying_append)
        with pytest.raises(KeyboardInterrupt):
            run_render(cfg, 0, renderer=Renderer(load_config("demo")))
    from tasks.common.models import MODELS

    MODELS.clear()  # a new process: the DINOv2 is loaded again
    run_render(cfg, 0, renderer=Renderer(load_config("demo")))
    a, b = (Path(partition_url(c, "render")) / "samples.parquet" for c in (clean, cfg))
    assert a.read_bytes() == b.read_bytes()
    np.testing.assert_array_equal(samples(cfg)["passed"], samples(clean)["passed"])
