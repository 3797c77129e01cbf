"""SDXL presets: the tiny SDXL model builds offline in diffusers' SDXL layout; the SDXL and distilled presets."""

import json

import pytest

from tasks.common.config import load_config
from tasks.common.models import load_diffusion
from tasks.common.tiny import ensure_tiny
from tasks.registry import stage_resources

pytestmark = pytest.mark.component


def test_tiny_sdxl_is_saved_in_sdxl_pipeline_layout_and_loads_through_from_pretrained():
    from diffusers import StableDiffusionXLPipeline

    root = ensure_tiny("diffusion-sdxl")
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert list((root / sub).glob("*.safetensors")), sub
    comps = load_diffusion("tiny-sdxl")
    assert comps.is_sdxl and type(comps.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert comps.unet.config.addition_embed_type == "text_time"
    assert comps.unet.config.cross_attention_dim == (
        comps.text_encoder.config.hidden_size + comps.text_encoder_2.config.hidden_size
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(root, use_safetensors=True)  # diffusers reads it as SDXL
    assert pipe.text_encoder_2 is not None


def test_sdxl_presets():
    paper = load_config("paper-sdxl")
    assert paper.models.diffusion == "sdxl" and paper.models.clip == "vit-l-14"
    assert (paper.render.height, paper.render.width) == (1024, 1024)
    assert paper.render.clip_resize == "antialias" and paper.render.guidance == "cfg"
    assert (
        "vae_path" in paper.models.model_fields_set
    )  # the fp16-fix VAE is a documented setting of the preset
    demo = load_config("demo-sdxl")
    assert demo.models.diffusion == "tiny-sdxl" and demo.render.device == "cpu" and demo.render.height == 64
    turbo = load_config("turbo")
    assert (
        turbo.models.diffusion == "sdxl-turbo" and turbo.render.guidance == "none" and turbo.render.steps == 4
    )
    assert "x2 images" in stage_resources(turbo)["render"].batch
    assert "x4 images" in stage_resources(paper)["render"].batch
