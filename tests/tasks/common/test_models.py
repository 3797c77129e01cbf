"""The model registry: tiny models load through the real loading path; real presets fail clearly offline."""

import json

import open_clip
import pytest
import torch

from tasks.common.models import ModelNotAvailableError, load_clip, load_diffusion, load_lm
from tasks.common.tiny import ensure_tiny

pytestmark = pytest.mark.component


def test_tiny_diffusion_is_saved_in_diffusers_layout_with_safetensors():
    root = ensure_tiny("diffusion")
    for sub in ("unet", "vae", "text_encoder"):
        assert list((root / sub).glob("*.safetensors")), sub
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    comps = load_diffusion("tiny")
    assert comps.vae_scale_factor == 4 and not comps.is_sdxl
    assert type(comps.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert not any(p.requires_grad for p in comps.unet.parameters())


def test_tiny_weights_are_deterministic():
    a, b = load_diffusion("tiny"), load_diffusion("tiny")
    for (name, pa), (_, pb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_clip_tokenizer_uses_the_real_clip_vocabulary():
    comps = load_diffusion("tiny")
    text = "A watercolor painting of a red fox in the snow, trending on artstation"
    ours = comps.tokenizer(
        text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    theirs = open_clip.get_tokenizer("ViT-B-32")([text])
    assert len(comps.tokenizer) == 49408
    assert torch.equal(ours[0][: int((theirs[0] != 0).sum())], theirs[0][theirs[0] != 0])


def test_tiny_open_clip_loads_through_local_dir():
    clip = load_clip("tiny")
    assert clip.source.startswith("local-dir:") and clip.image_size == 64
    with torch.inference_mode():
        emb = clip.model.encode_image(torch.zeros(1, 3, 64, 64))
        txt = clip.model.encode_text(clip.tokenizer(["a cat"]))
    assert emb.shape == txt.shape == (1, 32)


def test_tiny_lm_keeps_newlines():
    model, tok = load_lm("tiny")
    text = "a cat\n##\nmake it a dog\n%%\na dog\nEND"
    assert tok.decode(tok(text).input_ids) == text
    assert model.config.vocab_size == len(tok)


@pytest.mark.parametrize(
    "loader, preset, setting",
    [
        (load_diffusion, "sd15", "models.diffusion_path"),
        (load_diffusion, "sdxl", "models.diffusion_path"),
        (load_clip, "vit-l-14", "models.clip_path"),
        (load_lm, "Qwen/Qwen2.5-0.5B-Instruct", "models.lm_path"),
    ],
)
def test_unavailable_real_weights_name_preset_and_setting(loader, preset, setting):
    with pytest.raises(ModelNotAvailableError) as err:
        loader(preset)
    assert repr(preset) in str(err.value) and setting in str(err.value)


def test_unknown_diffusion_preset():
    with pytest.raises(ValueError, match="unknown diffusion preset"):
        load_diffusion("sd99")


def test_model_path_errors_tell_missing_corrupt_and_not_downloaded_apart(tmp_path):
    import shutil

    with pytest.raises(ModelNotAvailableError, match=r"models.diffusion_path=/no/such/sd15 does not exist"):
        load_diffusion("sd15", "/no/such/sd15")
    broken = tmp_path / "sd15"
    shutil.copytree(ensure_tiny("diffusion"), broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    with pytest.raises(
        ModelNotAvailableError, match=r"could not be loaded .*incomplete or a file is corrupt"
    ):
        load_diffusion("sd15", str(broken))
    with pytest.raises(ModelNotAvailableError, match="not available offline"):
        load_diffusion("sd15")
    with pytest.raises(ModelNotAvailableError, match=r"models.lm_path=/no/such/lm does not exist"):
        load_lm("some-org/some-lm", "/no/such/lm")
