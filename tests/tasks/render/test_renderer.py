"""The render engine's models: `models.vae_path` decodes with that VAE instead of the diffusion model's own."""

import json

import pytest
import torch

from tasks.common.config import load_config
from tasks.common.models import MODELS, ModelNotAvailableError, load_diffusion, load_vae
from tasks.common.tiny import ensure_tiny
from tasks.registry import stage_hash
from tasks.render.pairs import PairRequest, decode_latents, render_pairs
from tasks.render.renderer import Renderer, settings_from

pytestmark = pytest.mark.component

REQUESTS = [
    PairRequest("cat", "a photo of a cat", "a photo of a dog", 5),
    PairRequest("sea", "a house by the sea", "a house by the sea at night", 99),
]


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A tiny AutoencoderKL folder of the tiny model's shape with other weights (as sd-vae-ft-mse is to SD 1.5)."""
    from diffusers import AutoencoderKL

    config = json.loads((ensure_tiny("diffusion") / "vae" / "config.json").read_text())
    torch.manual_seed(1)
    vae = AutoencoderKL.from_config(config)
    folder = tmp_path_factory.mktemp("vae") / "vae-ft"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def test_load_vae_is_none_unset_and_the_folder_when_set(other_vae):
    assert load_vae(load_config("demo")) is None
    cfg = load_config("demo", [f"models.vae_path={other_vae}"])
    vae = load_vae(cfg, torch.float32, "cpu")
    own = load_diffusion("tiny").vae
    assert not torch.equal(vae.decoder.conv_out.weight, own.decoder.conv_out.weight)
    assert load_vae(cfg.models).config.latent_channels == 4  # the models section alone works too
    assert stage_hash(cfg, "render") != stage_hash(
        load_config("demo"), "render"
    )  # it changes what render writes


def test_render_decodes_with_the_vae_path_vae(other_vae):
    MODELS.clear()
    overrides = ["render.steps=3", "render.device=cpu"]
    own = Renderer(load_config("demo", overrides))
    settings = settings_from(load_config("demo", overrides))
    latents = []
    own_pairs = render_pairs(
        own.diffusion, REQUESTS, settings, step_callback=lambda i, t, x: latents.append(x)
    )
    ft = Renderer(load_config("demo", [*overrides, f"models.vae_path={other_vae}"]))
    calls = []
    hook = ft.diffusion.vae.decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        ft_pairs = ft.render(REQUESTS, settings)
    finally:
        hook.remove()
        MODELS.clear()
    assert calls  # the vae_path VAE decoded the pairs
    for name in ("unet", "text_encoder"):  # the rest of the model is the diffusion model's own
        for a, b in zip(getattr(ft.diffusion, name).parameters(), getattr(own.diffusion, name).parameters()):
            assert torch.equal(a, b)
    images = decode_latents(
        ft.diffusion.vae, latents[-1]
    )  # same UNet, same latents: only the decoder differs
    torch.testing.assert_close(ft_pairs.before, images[0::2], atol=1e-5, rtol=0)
    torch.testing.assert_close(ft_pairs.after, images[1::2], atol=1e-5, rtol=0)
    assert (ft_pairs.after - own_pairs.after).abs().max() > 1e-2


def test_a_vae_of_another_latent_shape_or_a_missing_folder_is_a_clear_error(tmp_path):
    from diffusers import AutoencoderKL

    config = json.loads((ensure_tiny("diffusion") / "vae" / "config.json").read_text())
    AutoencoderKL.from_config({**config, "latent_channels": 16}).save_pretrained(tmp_path / "flux-like")
    with pytest.raises(ModelNotAvailableError, match=r"models.vae_path=.*16 latent channels.*works on 4"):
        load_diffusion("tiny", vae_path=str(tmp_path / "flux-like"))
    with pytest.raises(ModelNotAvailableError, match=r"models.vae_path=/no/such/vae does not exist"):
        load_diffusion("tiny", vae_path="/no/such/vae")
