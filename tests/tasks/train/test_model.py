"""conv_in widening (paper sec. 3.2: new input channels zero-initialised, pretrained weights and bias kept)."""

import copy

import pytest
import torch

from tasks.common.models import load_diffusion
from tasks.train.model import EDIT_IN_CHANNELS, build_pipeline, load_pipeline, save_pipeline, widen_conv_in

pytestmark = pytest.mark.component


@pytest.fixture(scope="module")
def tiny():
    return load_diffusion("tiny")


def test_widened_conv_in_copies_weights_zeroes_new_channels_and_keeps_bias(tiny):
    original = copy.deepcopy(tiny.unet)
    unet = widen_conv_in(copy.deepcopy(tiny.unet))
    old, new = original.conv_in, unet.conv_in
    assert new.in_channels == EDIT_IN_CHANNELS and unet.config.in_channels == EDIT_IN_CHANNELS
    assert new.out_channels == old.out_channels and new.kernel_size == old.kernel_size and new.padding == old.padding
    assert torch.equal(new.weight[:, :4], old.weight)
    assert torch.count_nonzero(new.weight[:, 4:]) == 0
    assert old.bias is not None and torch.count_nonzero(old.bias) > 0
    assert torch.equal(new.bias, old.bias)
    # every other weight is untouched
    other = {k: v for k, v in original.state_dict().items() if not k.startswith("conv_in.")}
    widened = unet.state_dict()
    assert all(torch.equal(v, widened[k]) for k, v in other.items())


def test_widened_unet_ignores_the_image_channels_at_initialisation(tiny):
    """With zero weights on the new channels, the output equals the pretrained UNet's for any image latent."""
    original = copy.deepcopy(tiny.unet).eval()
    unet = widen_conv_in(copy.deepcopy(tiny.unet)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 77, tiny.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        reference = original(x, t, text).sample
        zeros = unet(torch.cat([x, torch.zeros_like(x)], dim=1), t, text).sample
        image = unet(torch.cat([x, torch.randn(x.shape, generator=g)], dim=1), t, text).sample
    torch.testing.assert_close(zeros, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(image, reference, rtol=0, atol=1e-6)


def test_widening_is_idempotent_and_refuses_to_shrink(tiny):
    unet = widen_conv_in(copy.deepcopy(tiny.unet))
    conv = unet.conv_in
    assert widen_conv_in(unet).conv_in is conv
    with pytest.raises(ValueError, match="more than"):
        widen_conv_in(unet, in_channels=4)


def test_pipeline_folder_round_trip(tiny, tmp_path):
    comps = copy.copy(tiny)
    comps.unet = widen_conv_in(copy.deepcopy(tiny.unet))
    with pytest.raises(ValueError, match="input channels"):
        build_pipeline(tiny)
    folder = save_pipeline(comps, tmp_path / "model")
    index = (folder / "model_index.json").read_text()
    assert '"_class_name": "StableDiffusionInstructPix2PixPipeline"' in index
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = load_pipeline(folder)
    assert type(pipe).__name__ == "StableDiffusionInstructPix2PixPipeline"
    assert pipe.unet.config.in_channels == EDIT_IN_CHANNELS
    assert torch.equal(pipe.unet.conv_in.bias, comps.unet.conv_in.bias)
    assert not list(tmp_path.glob(".model.tmp-*"))


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A VAE folder other than the model's own (as an fp16-fix VAE would be): the tiny VAE, perturbed."""
    from diffusers import AutoencoderKL

    from tasks.common.tiny import ensure_tiny

    vae = AutoencoderKL.from_pretrained(ensure_tiny("diffusion"), subfolder="vae")
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    folder = tmp_path_factory.mktemp("vae") / "other-vae"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def test_models_vae_path_replaces_the_vae_in_training_and_in_the_saved_model(tiny, other_vae, tmp_path):
    from tasks.common.config import ModelsConfig, TrainConfig
    from tasks.train.data import shard_urls
    from tasks.train.loop import train_editing_model
    from tasks.train.model import load_editing_model
    from tasks.train.synthetic import write_synthetic_shards

    comps = load_editing_model("tiny", vae_path=str(other_vae))
    own = tiny.vae.state_dict()
    assert any(not torch.equal(v, own[k]) for k, v in comps.vae.state_dict().items())

    index = write_synthetic_shards(str(tmp_path / "shards"), train_samples=4, val_samples=1, per_shard=4)
    cfg = TrainConfig(steps=1, batch_size=2, total_batch_size=2, resolution=64, num_workers=0,
                      device="cpu", shuffle_buffer=4, use_ema=False)
    result = train_editing_model(cfg, ModelsConfig(vae_path=str(other_vae)), shard_urls(index), tmp_path / "w")
    saved = result.model_dir / "vae"
    assert (saved / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (other_vae / "diffusion_pytorch_model.safetensors").read_bytes()


def test_a_bad_vae_path_names_the_setting(tmp_path):
    from tasks.common.errors import is_permanent
    from tasks.train.model import load_editing_model

    with pytest.raises(Exception, match=r"models.vae_path=.*does not exist") as missing:
        load_editing_model("tiny", vae_path=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match=r"the weights at .*empty could not be loaded.*models.vae_path") as empty:
        load_editing_model("tiny", vae_path=str(tmp_path / "empty"))
    assert is_permanent(missing.value) and is_permanent(empty.value)
