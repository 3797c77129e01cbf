"""The render stage on tiny models: contract, UNet-call accounting, savers, resume after a crash, OOM halving."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.common import storage
from tasks.common.config import load_config
from tasks.common.contract import Checkpoint
from tasks.common.layout import image_name, partition_dir
from tasks.registry import stage_hash
from tasks.render.early import early_step_count
from tasks.render.renderer import BatchSizer, Renderer, is_oom
from tasks.render.scheduling import SamplingPolicy
from tasks.render.stage import SAMPLE_COLUMNS
from tasks.render.stage import run as run_render

pytestmark = pytest.mark.component

STEPS, SAMPLES = 4, 6
TRIPLETS = pd.DataFrame(
    [
        {
            "caption_id": f"{i:016x}",
            "input": f"a photo of a cat number {i}",
            "edit": "make it a dog",
            "output": f"a photo of a dog number {i}",
            "status": "ok" if i != 3 else "rejected",
        }
        for i in range(5)
    ]
)
# adaptive rounds of 2 (target: render.keep.top_k = 2 in the demo), give up after 4, early rejection at half the
# steps without margin; a stricter direction threshold than the demo's so that some samples fail
SAVERS = [
    "render.adaptive.enabled=true",
    "render.adaptive.round_size=2",
    "render.adaptive.give_up_after=4",
    "render.early_reject.at=0.5",
    "render.early_reject.margin=0.0",
    "render.keep.clip_direction_threshold=0.15",
]


def config(root, *overrides):
    text = partition_dir(str(root), "text", stage_hash(load_config("demo"), "text"), 0)
    storage.write_parquet_atomic(f"{text}/triplets.parquet", TRIPLETS)
    storage.write_json_atomic(
        f"{text}/_SUCCESS.json", {"config_hash": stage_hash(load_config("demo"), "text")}
    )
    # the reference's policy (every saver off) unless a test turns one on; CLIP alone: the ladder's image
    # rungs (DINOv2, SSIM), on in the demo, are tested in tests/tasks/judge (on 4 steps of "a cat" -> "a dog"
    # the pairs are near-identical, SSIM 0.997, above the demo's ssim_max)
    return load_config(
        "demo",
        [
            f"output_root={root}",
            f"render.steps={STEPS}",
            "render.adaptive.enabled=false",
            "render.early_reject.at=null",
            f"render.samples_per_triplet={SAMPLES}",
            "judges.dino.enabled=false",
            "judges.ssim.enabled=false",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def renderer():
    return Renderer(load_config("demo"))


class Flaky:
    """Wraps a Renderer; ``fail(call_number, n_samples)`` may return an exception to raise instead."""

    def __init__(self, inner, fail):
        self.inner, self.fail, self.sizes = inner, fail, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def render_scored(self, requests, *args, **kwargs):
        self.sizes.append(len(requests))
        err = self.fail(len(self.sizes), len(requests))
        if err is not None:
            raise err
        return self.inner.render_scored(requests, *args, **kwargs)


def render_dir(root) -> Path:
    """The one render version a test wrote under ``root``."""
    (found,) = Path(root).glob("render/*/part-00000")
    return found


def samples(root) -> pd.DataFrame:
    return storage.read_parquet(str(render_dir(root) / "samples.parquet"))


def stored_keys(root) -> set[str]:
    """Sample keys with both images under render's images/ folder."""
    names = [p.name for p in (render_dir(root) / "images").iterdir()]
    inputs = {n.removesuffix("_input.png") for n in names if n.endswith("_input.png")}
    assert inputs == {n.removesuffix("_edited.png") for n in names if n.endswith("_edited.png")}
    return inputs


@pytest.mark.parametrize("mode", ["passed", "all"])
def test_save_images_passed_or_all(tmp_path, renderer, mode):
    cfg = config(tmp_path, f"render.save_images={mode}", *SAVERS)
    manifest = run_render(cfg, 0, renderer=renderer)
    df = samples(tmp_path)
    expected = df["passed"] if mode == "passed" else ~df["early_rejected"]
    assert df["image_stored"].equals(expected) and expected.sum() > df["kept"].sum()
    assert stored_keys(tmp_path) == set(df.loc[expected, "sample_key"])
    assert manifest["counts"]["images_stored"] == int(expected.sum())


def test_early_reject_dry_run_scores_but_drops_nothing(tmp_path, renderer):
    dropping = run_render(config(tmp_path / "drop", *SAVERS), 0, renderer=renderer)
    assert dropping["counts"]["early_rejected"] > 0
    cfg = config(tmp_path / "dry", *SAVERS, "render.early_reject.dry_run=true")
    manifest = run_render(cfg, 0, renderer=renderer)
    df = samples(tmp_path / "dry")
    assert not df["early_rejected"].any() and manifest["counts"]["early_rejected"] == 0
    assert (df["unet_steps"] == STEPS).all()
    assert df["early_clip_sim_dir"].notna().all() and df["clip_sim_dir"].notna().all()


def test_contract_and_unet_calls_reference_policy(tmp_path, renderer):
    cfg = config(tmp_path)
    manifest = run_render(cfg, 0, renderer=renderer)
    df = samples(tmp_path)
    assert list(df.columns) == SAMPLE_COLUMNS and len(df) == 4 * SAMPLES and df["sample_key"].is_unique
    assert df.groupby("caption_id")["sample_index"].apply(list).tolist() == [list(range(SAMPLES))] * 4
    assert (df["unet_steps"] == STEPS).all() and not df["early_rejected"].any()
    counts = manifest["counts"]
    assert counts["unet_calls"] == counts["unet_calls_reference"] == 4 * SAMPLES * STEPS
    assert counts["triplets_exhausted"] == 4 and counts["samples"] == len(df)
    assert df.groupby("caption_id")["kept"].sum().max() <= cfg.render.keep.top_k
    # like the reference, only the kept pairs' images are written (the passing rest were only staged)
    assert df["kept"].any() and (df["passed"] & ~df["kept"]).any(), "need passing samples that are not kept"
    assert df["image_stored"].equals(df["kept"])
    assert stored_keys(tmp_path) == set(df.loc[df["kept"], "sample_key"])
    for key in df.loc[df["kept"], "sample_key"]:
        assert image_name(key, "edited") in manifest["outputs"]
    assert not (render_dir(tmp_path) / "_progress").exists()  # staging went with the checkpoint
    assert run_render(cfg, 0, renderer=renderer)["skipped"]


def test_savers_counts_and_accounting(tmp_path, renderer):
    cfg = config(tmp_path, *SAVERS)
    manifest = run_render(cfg, 0, renderer=renderer)
    df = samples(tmp_path)
    early = df["early_rejected"]
    assert early.any() and df["passed"].any(), "the tiny models should give a mix of outcomes here"
    after = early_step_count(0.5, STEPS)
    assert (df.loc[early, "unet_steps"] == after).all() and (df.loc[~early, "unet_steps"] == STEPS).all()
    assert df.loc[early, "clip_sim_dir"].isna().all() and not df.loc[early, "passed"].any()
    assert df["early_clip_sim_dir"].notna().all()  # every sample was scored early
    assert (df.loc[early, "early_clip_sim_dir"] < 0.15).all()  # rejected ones were below threshold - 0 margin
    counts = manifest["counts"]
    assert counts["unet_calls"] == int(df["unet_steps"].sum()) < counts["unet_calls_reference"]
    assert counts["early_rejected"] == int(early.sum()) == manifest["rejected"]["early_rejected"]
    for cid, rows in df.groupby("caption_id"):
        n, passed = len(rows), int(rows["passed"].sum())
        assert rows["sample_index"].tolist() == list(range(n)) and n % 2 == 0  # whole rounds
        assert passed >= 2 or n == 4 and passed == 0 or n == SAMPLES, cid  # satisfied / gave up / exhausted
        assert passed < 2 or rows["passed"].iloc[: n - 2].sum() < 2  # stopped at the first round reaching 2
    statuses = [counts[f"triplets_{s}"] for s in ("satisfied", "gave_up", "exhausted")]
    assert sum(statuses) == 4 and min(statuses) > 0, statuses  # each rule fired on these tiny-model scores


def test_resume_after_crash_gives_identical_rows(tmp_path, renderer, monkeypatch):
    clean = tmp_path / "clean"
    run_render(config(clean, *SAVERS), 0, renderer=renderer)
    crashed = tmp_path / "crashed"
    cfg = config(crashed, *SAVERS)
    append, calls = Checkpoint.append, []

    def dying_append(self, batch_id, df):
        calls.append(batch_id)
        if len(calls) == 3:  # images of this cohort are written, its rows are not
            raise KeyboardInterrupt("killed")
        append(self, batch_id, df)

    monkeypatch.setattr(Checkpoint, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        run_render(cfg, 0, renderer=renderer)
    monkeypatch.setattr(Checkpoint, "append", append)
    assert not list(crashed.glob("render/*/part-00000/samples.parquet"))
    flaky = Flaky(renderer, lambda call, n: None)
    manifest = run_render(cfg, 0, renderer=flaky)
    resumed, reference = samples(crashed), samples(clean)
    assert resumed["sample_key"].is_unique
    pd.testing.assert_frame_equal(resumed, reference)
    assert (render_dir(crashed) / "samples.parquet").read_bytes() == (
        render_dir(clean) / "samples.parquet"
    ).read_bytes()
    assert (
        sum(flaky.sizes) == len(reference) - 2 * cfg.render.batch_samples
    )  # only the lost cohorts re-rendered
    assert manifest["counts"]["unet_calls"] == int(reference["unet_steps"].sum())
    stored = sorted(p.name for p in (render_dir(crashed) / "images").iterdir())
    assert stored == sorted(p.name for p in (render_dir(clean) / "images").iterdir())


def test_oom_halves_the_batch_and_continues(tmp_path, renderer):
    small = tmp_path / "small"
    run_render(config(small, "render.batch_samples=2"), 0, renderer=renderer)
    big = tmp_path / "big"
    oom = Flaky(
        renderer, lambda call, n: torch.OutOfMemoryError("CUDA out of memory (fake)") if n > 2 else None
    )
    manifest = run_render(config(big, "render.batch_samples=8"), 0, renderer=oom)
    assert oom.sizes[:3] == [8, 4, 2] and set(oom.sizes[3:]) == {2}
    assert manifest["figures"]["batch_samples"] == 2 and manifest["figures"]["oom_halvings"] == 2
    pd.testing.assert_frame_equal(samples(big), samples(small))
    broken = Flaky(renderer, lambda call, n: ValueError("not an OOM"))
    with pytest.raises(ValueError):
        run_render(config(tmp_path / "broken"), 0, renderer=broken)


def test_batch_sizer():
    sizer = BatchSizer(5)
    err = torch.OutOfMemoryError("CUDA out of memory")
    assert is_oom(err) and is_oom(RuntimeError("CUDA error: out of memory")) and not is_oom(ValueError("x"))
    sizer.shrink(err)
    sizer.shrink(err)
    assert sizer.size == 1 and sizer.halvings == 2
    with pytest.raises(torch.OutOfMemoryError):
        sizer.shrink(err)


def test_auto_batch_on_cpu_and_dtype_noop(renderer):
    from tasks.render.renderer import CPU_AUTO_BATCH, settings_from

    cfg = load_config("demo", ["render.dtype=float16", "render.compile=true", "render.batch_samples=auto"])
    assert renderer.auto_batch_samples(settings_from(cfg), 64) == CPU_AUTO_BATCH
    assert renderer.auto_batch_samples(settings_from(cfg), 3) == 3
    cpu = Renderer(cfg)
    assert cpu.dtype == torch.float32 and not cpu.compiled
    assert np.isfinite(
        cpu.score(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64), ["a"], ["b"])["clip_sim_0"]
    ).all()


def test_policy_and_hash_from_config():
    paper = load_config("paper")
    assert SamplingPolicy.from_config(paper) == SamplingPolicy(
        max_samples=100
    )  # the reference: one round of 100
    fast = load_config("fast")
    assert SamplingPolicy.from_config(fast) == SamplingPolicy(
        max_samples=100, round_size=8, target_passed=4, give_up_after=32
    )
    # adaptive with the target taken from render.keep.top_k; the filter's top_k is a re-selection only
    assert stage_hash(fast, "render") != stage_hash(load_config("fast", ["render.keep.top_k=2"]), "render")
    assert stage_hash(fast, "render") == stage_hash(load_config("fast", ["filter.top_k=2"]), "render")
    assert SamplingPolicy.from_config(load_config("fast", ["render.keep.top_k=2"])).target_passed == 2


def test_render_and_filter_on_an_object_store(renderer):
    """fsspec all the way: staged images move to images/ and the checkpoint goes, on memory:// too."""
    import uuid

    from tasks.filter.stage import run as run_filter

    root = f"memory://editforge-test-{uuid.uuid4().hex[:8]}/run"
    cfg = config(root)
    manifest = run_render(cfg, 0, renderer=renderer)
    part = f"{root}/{manifest['path']}"
    df = storage.read_parquet(f"{part}/samples.parquet")
    images = storage.list_files(f"{part}/images")
    assert len(images) == 2 * int(df["kept"].sum()) == 2 * manifest["counts"]["images_stored"] > 0
    assert not storage.exists(f"{part}/_progress")
    assert run_filter(cfg, 0)["counts"]["out"] == int(df["kept"].sum())


def test_selection_or_sampling_changes_reuse_the_loaded_models(tmp_path):
    """Two renders in one process with another top-k or text temperature load no model twice (the
    cache is keyed by model identity, not by the stage hash); another scheduler does load again."""
    from tasks.common.models import MODELS

    def render(root, *overrides):
        cfg = load_config(
            "demo",
            [
                f"output_root={root}",
                "render.steps=2",
                "render.samples_per_triplet=2",
                "render.adaptive.enabled=false",
                "render.early_reject.at=null",
                "judges.dino.enabled=false",
                "judges.ssim.enabled=false",
                *overrides,
            ],
        )
        text = partition_dir(str(root), "text", stage_hash(cfg, "text"), 0)
        storage.write_parquet_atomic(f"{text}/triplets.parquet", TRIPLETS)
        storage.write_json_atomic(f"{text}/_SUCCESS.json", {"config_hash": stage_hash(cfg, "text")})
        return run_render(cfg, 0)  # no renderer given: the stage's own, from the model cache

    MODELS.clear()
    MODELS.loads.clear()
    first = render(tmp_path / "a")
    second = render(tmp_path / "b", "render.keep.top_k=1")
    third = render(tmp_path / "c", "text.temperature=0.9")
    assert not any(m["skipped"] for m in (first, second, third))
    assert second["counts"]["out"] < first["counts"]["out"]
    assert MODELS.loads == {"diffusion": 1, "clip": 1}
    render(tmp_path / "d", "render.scheduler=ddim")
    assert MODELS.loads == {"diffusion": 2, "clip": 1}


@pytest.mark.parametrize("kill_at", [1, 2, 4])
def test_resume_in_a_fresh_process_is_byte_identical_at_any_checkpoint(
    tmp_path, renderer, monkeypatch, kill_at
):
    """Killed after `kill_at` chunks, resumed with new models' caches (as a new process has): the same bytes."""
    clean = tmp_path / "clean"
    run_render(config(clean, *SAVERS), 0, renderer=Renderer(load_config("demo")))
    crashed = tmp_path / "crashed"
    cfg = config(crashed, *SAVERS)
    append, calls = Checkpoint.append, []

    def dying_append(self, batch_id, df):
        calls.append(batch_id)
        if len(calls) > kill_at:
            raise KeyboardInterrupt("killed")
        append(self, batch_id, df)

    with monkeypatch.context() as patch:
        patch.setattr(Checkpoint, "append", dying_append)
        with pytest.raises(KeyboardInterrupt):
            run_render(cfg, 0, renderer=Renderer(load_config("demo")))
    run_render(cfg, 0, renderer=Renderer(load_config("demo")))
    assert (render_dir(crashed) / "samples.parquet").read_bytes() == (
        render_dir(clean) / "samples.parquet"
    ).read_bytes()
    images = {p.name: p.read_bytes() for p in (render_dir(clean) / "images").iterdir()}
    assert {p.name: p.read_bytes() for p in (render_dir(crashed) / "images").iterdir()} == images


def test_guidance_none_renders_the_partition_with_two_images_per_unet_sample(tmp_path, renderer):
    """The distilled mode end to end through the stage: UNet rows 2 per sample, cfg recorded as 1."""
    from pathlib import Path

    cfg = config(tmp_path, "render.guidance=none", "render.batch_samples=3")
    seen = []
    handle = renderer.diffusion.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        manifest = run_render(cfg, 0, renderer=renderer)
    finally:
        handle.remove()
    df = storage.read_parquet(str(Path(cfg.output_root) / manifest["path"] / "samples.parquet"))
    assert len(df) == 4 * SAMPLES and (df["cfg_scale"] == 1.0).all()
    assert set(seen) == {2 * 3} and len(seen) == STEPS * 4 * SAMPLES // 3
    assert manifest["counts"]["unet_calls"] == 4 * SAMPLES * STEPS
    assert stage_hash(cfg, "render") != stage_hash(config(tmp_path), "render")


def test_demo_sdxl_preset_renders_a_partition_offline_with_sdxl_conditioning(tmp_path):
    """The tiny SDXL demo: render loads tiny-sdxl from its diffusers folder and conditions it as SDXL."""
    from pathlib import Path

    root = tmp_path / "sdxl"
    text = partition_dir(str(root), "text", stage_hash(load_config("demo-sdxl"), "text"), 0)
    storage.write_parquet_atomic(f"{text}/triplets.parquet", TRIPLETS)
    storage.write_json_atomic(
        f"{text}/_SUCCESS.json", {"config_hash": stage_hash(load_config("demo-sdxl"), "text")}
    )
    cfg = load_config(
        "demo-sdxl",
        [
            f"output_root={root}",
            "render.steps=3",
            "render.adaptive.enabled=false",
            "render.early_reject.at=null",
            "render.samples_per_triplet=2",
        ],
    )
    renderer = Renderer(cfg)
    assert renderer.diffusion.is_sdxl and renderer.diffusion.preset == "tiny-sdxl"
    seen = []
    handle = renderer.diffusion.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"]), with_kwargs=True
    )
    try:
        manifest = run_render(cfg, 0, renderer=renderer)
    finally:
        handle.remove()
    assert seen and all(
        t.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 16 for t in seen
    )  # 4 rows x 4 samples
    df = storage.read_parquet(str(Path(cfg.output_root) / manifest["path"] / "samples.parquet"))
    assert len(df) == 4 * 2 and np.isfinite(df["clip_sim_dir"]).all()
