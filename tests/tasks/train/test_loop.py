"""The training loop on the tiny model: it runs, saves a loadable IP2P pipeline, and resumes exactly."""

import math

import pytest
import torch
from safetensors.torch import load_file

from tasks.common.config import ModelsConfig, TrainConfig
from tasks.train.data import read_examples, shard_urls
from tasks.train.infer import edit_image
from tasks.train.loop import latest_checkpoint, list_checkpoints, train_editing_model
from tasks.train.model import load_pipeline
from tasks.train.synthetic import write_synthetic_shards

pytestmark = pytest.mark.component

CFG = TrainConfig(steps=4, batch_size=2, gradient_accumulation_steps=2, resolution=64, num_workers=0, device="cpu",
                  checkpoint_every=2, shuffle_buffer=8, use_ema=True, ema_decay=0.9, log_every=1)


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")), train_samples=12, val_samples=2, per_shard=4)


@pytest.fixture(scope="module")
def uninterrupted(index, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return train_editing_model(CFG, ModelsConfig(), shard_urls(index), workdir, run_key="k1")


def _unet_weights(model_dir):
    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_training_runs_and_saves_a_pipeline_that_edits(uninterrupted, index):
    result = uninterrupted
    assert result.steps == 4 and result.resumed_from == 0
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert all(math.isfinite(h["loss"]) and h["lr"] == pytest.approx(1e-4) for h in result.history)
    assert result.history[-1]["samples"] == 4 * 2 * 2 and result.steps_per_s > 0
    assert [s for s, _ in list_checkpoints(result.model_dir.parent / "checkpoints")] == [2, 4]

    pipe = load_pipeline(result.model_dir)
    assert pipe.unet.config.in_channels == 8
    example = read_examples(shard_urls(index, "val"), 1)[0]
    out = edit_image(pipe, example.original, example.instruction, steps=2, seed=0)
    assert out.size == (64, 64)


def test_killed_run_resumes_at_its_checkpoint_and_matches_the_uninterrupted_run(uninterrupted, index, tmp_path):
    def kill_at_3(record):
        if record["step"] == 3:
            raise Killed("simulated crash after step 3")

    with pytest.raises(Killed):
        train_editing_model(CFG, ModelsConfig(), shard_urls(index), tmp_path, run_key="k1", on_step=kill_at_3)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert not (tmp_path / "model").exists()

    resumed = train_editing_model(CFG, ModelsConfig(), shard_urls(index), tmp_path, run_key="k1")
    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    # same data, noise and optimizer state after the resume: the same losses and the same final weights
    for a, b in zip(resumed.history, uninterrupted.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    expected, got = _unet_weights(uninterrupted.model_dir), _unet_weights(resumed.model_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_checkpoints_of_another_config_are_not_resumed(tmp_path):
    folder = tmp_path / "checkpoints"
    for step, key in ((2, "old"), (4, "old"), (3, "new")):
        (folder / f"checkpoint-{step:08d}").mkdir(parents=True)
        (folder / f"checkpoint-{step:08d}" / "trainer_state.json").write_text(f'{{"step": {step}, "run_key": "{key}"}}')
    (folder / ".tmp-checkpoint-00000005").mkdir()  # an interrupted save is never a checkpoint
    assert latest_checkpoint(folder, "new").name == "checkpoint-00000003"
    assert [s for s, _ in list_checkpoints(folder)] == [3]
