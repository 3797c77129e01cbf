"""Flow tier: the evaluation flow (paper Fig. 8/10) on a tiny InstructPix2Pix model and synthetic held-out shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.flow

GUIDANCE = [1.0, 1.5, 2.0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from tasks.train.synthetic import write_tiny_editing_model

    return write_tiny_editing_model(str(tmp_path_factory.mktemp("ip2p") / "model"))


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> str:
    from tasks.train.synthetic import write_synthetic_shards

    return write_synthetic_shards(
        str(tmp_path_factory.mktemp("shards")), train_samples=4, val_samples=3, per_shard=4
    )


@pytest.fixture(scope="module")
def evaluated(prefect_harness, tmp_path_factory, model_dir, heldout):
    from flows.evaluate import evaluate

    overrides = [f"output_root={tmp_path_factory.mktemp('out')}", "name=evaltest"]
    kwargs = {"model": model_dir, "index": heldout, "image_guidance": GUIDANCE, "steps": 3, "limit": 3}
    return overrides, kwargs, evaluate("demo", overrides, **kwargs)


def test_metrics_plot_parquet_and_artifacts(evaluated):
    import pandas as pd
    from PIL import Image
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.common.layout import artifact_key

    _, _, result = evaluated
    folder = Path(result["dir"])
    assert folder.parent.name == "eval" and folder.name == result["eval_hash"]
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = metrics["metrics"]
    assert [r["image_guidance"] for r in rows] == GUIDANCE and all(r["n"] == 3 for r in rows)
    assert all(r["text_guidance"] == 7.5 for r in rows)
    assert len({round(r["clip_sim_image"], 6) for r in rows}) == 3  # the image guidance changes the edits
    samples = pd.read_parquet(folder / "eval.parquet")
    assert len(samples) == 9 and set(samples["image_guidance"]) == set(GUIDANCE)
    assert {
        "key",
        "seed",
        "instruction",
        "input_caption",
        "output_caption",
        "clip_sim_image",
        "clip_sim_dir",
    } <= set(samples)
    means = samples.groupby("image_guidance")[["clip_sim_image", "clip_sim_dir"]].mean()
    for r in rows:
        assert means.loc[r["image_guidance"], "clip_sim_dir"] == pytest.approx(r["clip_sim_dir"], abs=1e-9)
    with Image.open(folder / "eval.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    with Image.open(folder / "examples.png") as sheet:  # 3 samples x (input + 3 edits) of 64 px
        assert sheet.size == (64 * 4, 64 * 3)

    key = artifact_key("evaltest", "eval", result["eval_hash"])
    with get_client(sync_client=True) as client:
        tables = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
        reports = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key("evaltest", "eval-report", result["eval_hash"])])
            )
        )
    assert tables and tables[0].type == "table"
    table = json.loads(tables[0].data) if isinstance(tables[0].data, str) else tables[0].data
    assert [r["image_guidance"] for r in table] == GUIDANCE
    assert reports and reports[0].type == "markdown" and "eval.png" in reports[0].data


def test_rerun_is_identical_and_other_settings_write_another_folder(evaluated):
    from flows.evaluate import evaluate

    overrides, kwargs, first = evaluated
    before = Path(first["files"]["metrics"]).read_bytes()
    again = evaluate("demo", overrides, **kwargs)
    assert again["dir"] == first["dir"] and Path(again["files"]["metrics"]).read_bytes() == before
    assert again["metrics"] == first["metrics"]
    other = evaluate("demo", overrides, **{**kwargs, "image_guidance": [1.2], "limit": 2})
    assert other["dir"] != first["dir"] and [r["image_guidance"] for r in other["metrics"]] == [1.2]
    assert Path(first["files"]["metrics"]).read_bytes() == before  # the first evaluation is untouched


def test_image_similarity_is_the_clip_cosine_of_the_two_images(evaluated, model_dir, heldout):
    """Independently of the scorer: diffusers edits sample 0 alone, open_clip embeds both images."""
    import numpy as np
    import open_clip
    import pandas as pd
    import torch
    import torch.nn.functional as F
    import webdataset as wds
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from tasks.common.tiny import ensure_tiny
    from tasks.pack.index import read_index

    _, _, result = evaluated
    row = (
        pd.read_parquet(Path(result["dir"]) / "eval.parquet")
        .query("sample == 0 and image_guidance == 2.0")
        .iloc[0]
    )
    sample = next(
        iter(wds.WebDataset(read_index(heldout)["splits"]["val"]["shards"], shardshuffle=False).decode("pil"))
    )
    assert sample["__key__"] == row["key"] and sample["input.jpg"].size == (
        64,
        64,
    )  # the demo's 64 px: no resize
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    edited = pipe(
        sample["instruction.txt"],
        image=sample["input.jpg"],
        num_inference_steps=3,
        guidance_scale=7.5,
        image_guidance_scale=2.0,
        generator=torch.Generator().manual_seed(int(row["seed"])),
    ).images[0]

    model = open_clip.create_model(f"local-dir:{ensure_tiny('clip')}").eval()
    size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def embed(img):
        x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 255
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        with torch.no_grad():
            return model.encode_image((x - mean) / std)[0]

    cosine = F.cosine_similarity(embed(sample["input.jpg"]), embed(edited), dim=0).item()
    assert row["clip_sim_image"] == pytest.approx(cosine, abs=1e-4)


def test_evaluates_the_model_trained_for_the_config(prefect_harness, tmp_path, heldout):
    from flows.evaluate import evaluate
    from flows.train import train

    overrides = [
        f"output_root={tmp_path}",
        "name=evaltrained",
        "train.steps=1",
        "train.batch_size=2",
        "train.sample_steps=1",
        "train.shuffle_buffer=4",
    ]
    trained = train("demo", overrides, heldout)
    result = evaluate("demo", overrides, index=heldout, image_guidance=[1.5], steps=2, limit=1)
    assert result["model_dir"] == str(tmp_path / trained["model_dir"])
    assert json.loads(Path(result["files"]["metrics"]).read_text())["model"] == {
        "train_hash": trained["config_hash"]
    }


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--image-guidance", "0.5,1.5"], "each must be >= 1"),
        (["--image-guidance", "1.0,x"], "'x' is not a number"),
        (["--split", "test"], "split 'test'"),
        ([], "no trained model for this config: it has no shards yet"),
        (["--model", "MISSING"], "no such folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    from typer.testing import CliRunner

    from flows.cli import app

    args = [str(tmp_path / "nope") if a == "MISSING" else a for a in args]
    result = CliRunner().invoke(app, ["evaluate", "--set", f"output_root={tmp_path}", *args])
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, (
        result.output
    )
