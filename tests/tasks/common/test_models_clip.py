"""CLIP presets are built with the activation their weights were trained with (QuickGELU for OpenAI's)."""

import json
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from tasks.common.models import (
    CLIP_PRESETS,
    ClipConfigMismatchError,
    ModelNotAvailableError,
    clip_build,
    load_clip,
    model_uses_quick_gelu,
)
from tasks.common.tiny import ensure_tiny

pytestmark = pytest.mark.component


def _openai_vit_l14_state_dict() -> dict[str, torch.Tensor]:
    """A random-init state dict in the layout of OpenAI's ViT-L/14 (the key names open_clip mirrors), float16
    as OpenAI ships it. Shapes come from a meta-device model: nothing 428M-sized is initialised twice."""
    cfg = open_clip.get_model_config("ViT-L-14")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in open_clip.CLIP(**cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    return {k: (torch.randn(shape, generator=gen) * 0.02).half() for k, shape in shapes.items()}


@pytest.fixture(scope="module")
def vit_l14_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "ViT-L-14-openai.safetensors"
    sd = _openai_vit_l14_state_dict()
    assert "visual.proj" in sd and "transformer.resblocks.11.attn.in_proj_weight" in sd  # OpenAI's key layout
    save_file(sd, str(path))
    return path


def test_vit_l14_checkpoint_file_loads_with_quick_gelu_and_no_mismatch_warning(vit_l14_file):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip = load_clip("vit-l-14", str(vit_l14_file))
    assert not [w for w in caught if "QuickGELU" in str(w.message)]
    acts = [m.gelu for m in clip.model.modules() if hasattr(m, "c_fc")]  # open_clip names the slot "gelu"
    assert len(acts) == 24 + 12 and all(isinstance(a, QuickGELU) for a in acts)  # every vision and text MLP
    assert clip.image_size == 224
    from safetensors.torch import load_file

    torch.testing.assert_close(clip.model.visual.proj, load_file(str(vit_l14_file))["visual.proj"].float())


def test_the_hub_tag_build_agrees_with_open_clips_pretrained_table():
    """No download here: the tag path's build equals the activation open_clip's own table records for
    the tag, which is what its QuickGELU-mismatch warning compares."""
    spec = CLIP_PRESETS["vit-l-14"]
    build = clip_build("vit-l-14")
    assert (build.name, build.pretrained, build.quick_gelu) == ("ViT-L-14-quickgelu", "openai", True)
    assert open_clip.get_pretrained_cfg(spec.arch, spec.tag)["quick_gelu"] is True
    assert open_clip.get_model_config(build.name)["quick_gelu"] is True
    # any open_clip name + tag: the tag decides (OpenAI's ViT-B/32: QuickGELU; a LAION one: GELU)
    assert clip_build("ViT-B-32", "openai").quick_gelu is True
    assert clip_build("ViT-B-32", "laion2b_s34b_b79k").quick_gelu is False


def test_a_folder_whose_config_contradicts_the_preset_is_an_error(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    tiny = ensure_tiny("clip")
    config = json.loads((tiny / "open_clip_config.json").read_text())
    config["model_cfg"]["quick_gelu"] = False
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    (folder / "open_clip_model.safetensors").write_bytes((tiny / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(ClipConfigMismatchError, match=r"quick_gelu=false.*models.clip=vit-l-14.*QuickGELU"):
        load_clip("vit-l-14", str(folder))
    config["model_cfg"]["quick_gelu"] = True
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    assert model_uses_quick_gelu(load_clip("vit-l-14", str(folder)).model)


def test_a_checkpoint_of_another_architecture_and_a_pickle_are_clear_errors(tmp_path):
    other = tmp_path / "tiny.safetensors"
    other.write_bytes((ensure_tiny("clip") / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(
        ClipConfigMismatchError, match=r"does not fit models.clip=vit-l-14 \(ViT-L-14-quickgelu\)"
    ):
        load_clip("vit-l-14", str(other))
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"not really")
    with pytest.raises(ModelNotAvailableError, match=r"models.clip_path=.*safetensors only"):
        load_clip("vit-l-14", str(pickle))
