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

CFG = TrainConfig(steps=4, batch_size=2, total_batch_size=4, resolution=64, num_workers=0, device="cpu",
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


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_model_folder_is_the_base_model_plus_the_trained_unet(uninterrupted):
    from tasks.common.tiny import ensure_tiny

    base, model = ensure_tiny("diffusion"), uninterrupted.model_dir
    for component in ("text_encoder", "tokenizer", "vae", "scheduler"):
        assert _files(model / component) == _files(base / component), component  # copied, byte for byte
    assert _files(model / "unet") != _files(base / "unet")


def test_gradient_clipping_is_off_by_default_and_a_switch(index, tmp_path):
    """conv_in's image channels start at zero (no weight decay pull): their first update is Adam's ~lr step,
    unless the gradient is clipped to almost nothing (max_grad_norm tiny: the update drops below Adam's eps)."""
    one = CFG.model_copy(update={"steps": 1, "total_batch_size": 2, "use_ema": False, "checkpoint_every": 1})
    moved = {}
    for name, norm in (("default", None), ("clipped", 1e-12)):
        cfg = one.model_copy(update={"max_grad_norm": norm})
        result = train_editing_model(cfg, ModelsConfig(), shard_urls(index), tmp_path / name, run_key=name)
        moved[name] = _unet_weights(result.model_dir)["conv_in.weight"][:, 4:].abs().max().item()
    assert TrainConfig().max_grad_norm is None
    assert moved["default"] > 0.5 * CFG.learning_rate
    assert moved["clipped"] < 0.01 * moved["default"]


@pytest.fixture(scope="module")
def tiny_sdxl():
    from tasks.common.tiny import ensure_tiny

    return ensure_tiny("diffusion-sdxl")


def test_sdxl_training_lowers_the_loss_and_saves_an_sdxl_editing_pipeline(index, tiny_sdxl, tmp_path):
    from diffusers import DDPMScheduler

    from tasks.train.conditioning import null_text
    from tasks.train.data import Augment, make_train_loader
    from tasks.train.loop import batch_loss
    from tasks.train.model import load_editing_model

    models = ModelsConfig(diffusion="sdxl", diffusion_path=str(tiny_sdxl))
    cfg = CFG.model_copy(update={"steps": 8, "total_batch_size": 2, "learning_rate": 1e-3,
                                 "use_ema": False, "checkpoint_every": 8})
    comps = load_editing_model("sdxl", str(tiny_sdxl))
    batch = next(make_train_loader(shard_urls(index), comps.tokenizer, Augment(64), 8, seed=5, shuffle_buffer=8,
                                   tokenizer_2=comps.tokenizer_2))
    assert batch["input_ids_2"].shape == (8, 77) and batch["time_ids"].shape == (8, 6)
    assert (batch["time_ids"][:, [0, 1, 4, 5]] == 64).all()  # 64² sources, 64² crops
    noise_scheduler = DDPMScheduler.from_config(comps.scheduler.config)

    def fixed_batch_loss(unet) -> float:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            return batch_loss(batch, gen, 0.0, comps, unet, noise_scheduler, null_text(comps), torch.float32).item()

    before = fixed_batch_loss(comps.unet)
    result = train_editing_model(cfg, models, shard_urls(index), tmp_path, run_key="xl")
    from diffusers import StableDiffusionXLInstructPix2PixPipeline

    pipe = StableDiffusionXLInstructPix2PixPipeline.from_pretrained(result.model_dir)  # plain diffusers, as a user would
    pipe.set_progress_bar_config(disable=True)
    assert type(load_pipeline(result.model_dir)).__name__ == "StableDiffusionXLInstructPix2PixPipeline"
    assert pipe.unet.config.in_channels == 8 and not pipe.config.force_zeros_for_empty_prompt
    after = fixed_batch_loss(pipe.unet)
    assert after < 0.9 * before, (before, after, [h["loss"] for h in result.history])

    example = read_examples(shard_urls(index, "val"), 1)[0]
    out = edit_image(pipe, example.original, example.instruction, steps=2, seed=0)
    assert out.size == (64, 64)
    model = result.model_dir
    for component in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"):
        assert _files(model / component) == _files(tiny_sdxl / component), component
    assert {"vocab.json", "merges.txt"} <= set(_files(model / "tokenizer_2"))


def _unet_bytes(model_dir):
    return (model_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_a_kill_inside_a_checkpoint_write_resumes_to_the_uninterrupted_bytes(uninterrupted, index, tmp_path,
                                                                             monkeypatch):
    """Killed right after the 7th file accelerate writes into a checkpoint (5 per checkpoint: model, optimizer,
    scheduler, RNG states, EMA; the 7th is the optimizer of checkpoint 4), then resumed: checkpoint 2 is
    taken, the half-written one is not, and the model has the uninterrupted run's bytes."""
    import accelerate.utils.other

    written = []

    def counting(write):
        def wrapped(obj, f, *args, **kwargs):
            write(obj, f, *args, **kwargs)
            if ".tmp-checkpoint-" in str(f):
                written.append(str(f))
                if len(written) == 7:
                    raise Killed(f"killed after writing {f}")
        return wrapped

    # the two writers accelerate's checkpoint uses: safetensors (the model) and torch.save (everything else)
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", counting(accelerate.utils.other.safe_save_file))
    monkeypatch.setattr(torch, "save", counting(torch.save))
    with pytest.raises(Killed):
        train_editing_model(CFG, ModelsConfig(), shard_urls(index), tmp_path, run_key="k1")
    monkeypatch.undo()
    assert len({f.rsplit("/", 2)[-2] for f in written}) == 2  # inside the second checkpoint's save
    partial = tmp_path / "checkpoints" / ".tmp-checkpoint-00000004"
    assert len(list(partial.iterdir())) == 2 and [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]

    resumed = train_editing_model(CFG, ModelsConfig(), shard_urls(index), tmp_path, run_key="k1")
    assert resumed.resumed_from == 2 and not partial.exists()
    assert _unet_bytes(resumed.model_dir) == _unet_bytes(uninterrupted.model_dir)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in uninterrupted.history]


def test_a_checkpoint_of_another_process_count_is_refused_unless_asked(uninterrupted, index, tmp_path):
    """The samples, order and draws do not depend on the process count, the rounding of the summed gradients
    does: resuming on another count is refused, or continues with `resume_other_processes`."""
    import json
    import shutil

    from tasks.train.loop import ProcessCountChangedError

    shutil.copytree(uninterrupted.model_dir.parent / "checkpoints" / "checkpoint-00000002",
                    tmp_path / "checkpoints" / "checkpoint-00000002")
    state_file = tmp_path / "checkpoints" / "checkpoint-00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 8}))
    with pytest.raises(ProcessCountChangedError, match=r"written by 8 process\(es\), this run has 1: resume with 8 .*"
                                                       r"train.resume_other_processes=true"):
        train_editing_model(CFG, ModelsConfig(), shard_urls(index), tmp_path, run_key="k1")
    cfg = CFG.model_copy(update={"resume_other_processes": True})
    resumed = train_editing_model(cfg, ModelsConfig(), shard_urls(index), tmp_path, run_key="k1")
    assert resumed.resumed_from == 2 and resumed.steps == 4
    # one process of 8 before: the same samples and draws, so here (one process both times) the same bytes
    assert _unet_bytes(resumed.model_dir) == _unet_bytes(uninterrupted.model_dir)


def test_8bit_adam_without_bitsandbytes_says_what_to_install(index, tmp_path, monkeypatch):
    """bitsandbytes comes with the `cluster` extra (the GPU image), not with the test environment: importing it
    makes every diffusers model load print two warnings offline."""
    import sys

    from tasks.common.config import ConfigError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = CFG.model_copy(update={"steps": 1, "use_8bit_adam": True})
    with pytest.raises(ConfigError, match=r"train.use_8bit_adam needs bitsandbytes: pip install 'editforge\[cluster\]'"):
        train_editing_model(cfg, ModelsConfig(), shard_urls(index), tmp_path, run_key="8bit")
