"""`editforge edit`: one image or a folder with a tiny InstructPix2Pix model (SD and SDXL); bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.component

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from tasks.train.synthetic import write_tiny_editing_model

    return write_tiny_editing_model(str(tmp_path_factory.mktemp("ip2p") / "model"))


def _image(path: Path, size: tuple[int, int], colour=(200, 40, 40)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def _edit(*args: str):
    return runner.invoke(app, ["edit", *args, "--steps", "2"])


def test_one_image_next_to_it_deterministic(tmp_path, model_dir):
    src = _image(tmp_path / "photo.jpg", (64, 48))
    before = src.read_bytes()
    result = _edit(str(src), "make it blue", "--model", model_dir, "--image-guidance", "1.5")
    assert result.exit_code == 0, result.output
    dest = tmp_path / "photo.edited.png"
    assert f"{src} -> {dest}" in result.output and len(result.output.strip().splitlines()) == 1
    with Image.open(dest) as out:
        assert out.format == "PNG" and out.size == (64, 48)
    assert src.read_bytes() == before  # the input is never touched
    first = dest.read_bytes()
    assert _edit(str(src), "make it blue", "--model", model_dir).exit_code == 0
    assert dest.read_bytes() == first  # seeded: the same edit again


def test_a_folder_into_out(tmp_path, model_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    _image(folder / "a.png", (64, 48))
    _image(folder / "b.webp", (40, 32), (30, 30, 200))
    _image(folder / "a.edited.png", (16, 16))  # an earlier output: not an input
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    result = _edit(str(folder), "make it snowy", "--model", model_dir, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 2
    assert sorted(p.name for p in out.iterdir()) == ["a.edited.png", "b.edited.png"]
    assert Image.open(out / "a.edited.png").size == (64, 48) and Image.open(out / "b.edited.png").size == (
        40,
        32,
    )
    # editing the folder = editing each image alone (same seed)
    alone = tmp_path / "alone"
    assert (
        _edit(str(folder / "b.webp"), "make it snowy", "--model", model_dir, "--out", str(alone)).exit_code
        == 0
    )
    assert (alone / "b.edited.png").read_bytes() == (out / "b.edited.png").read_bytes()


def test_sdxl_instruct_pix2pix_folder(tmp_path):
    from tasks.train.synthetic import write_tiny_editing_model

    model = write_tiny_editing_model(str(tmp_path / "xl"), sdxl=True)
    src = _image(tmp_path / "x.png", (64, 64))
    result = _edit(str(src), "make it red", "--model", model)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "x.edited.png").size == (64, 64)


def test_the_config_trained_model_is_the_default(tmp_path, model_dir, monkeypatch):
    """Without --model: the training flow's model for the config (found through its manifest)."""
    import flows.edit  # noqa: F401  (the command resolves the model through tasks.train.stage.trained_model)
    import tasks.train.stage as stage

    calls = []
    monkeypatch.setattr(
        stage, "trained_model", lambda cfg, index, args: calls.append(args) or (model_dir, "h")
    )
    src = _image(tmp_path / "p.png", (32, 32))
    result = _edit(str(src), "make it blue", "--set", f"output_root={tmp_path}")
    assert result.exit_code == 0, result.output
    assert calls == [f"--preset demo --set output_root={tmp_path}"] and (tmp_path / "p.edited.png").is_file()


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "no such file or folder"),
        ("empty", "no images in this folder"),
        ("text", "not an image file"),
        ("corrupt", "not a readable image"),
        ("t2i", "its model_index.json names StableDiffusionPipeline"),
        ("unet", "found a single UNet2DConditionModel"),
        ("untrained", "no trained model for this config yet"),
        ("noshards", "it has no shards yet"),
        ("guidance", "image guidance must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, model_dir, case, needle):
    from tasks.common.config import load_config
    from tasks.common.tiny import ensure_tiny
    from tasks.registry import index_url
    from tasks.train.synthetic import write_synthetic_shards

    image = _image(tmp_path / "ok.png", (32, 32))
    model = ["--model", model_dir]
    args = {
        "missing": [str(tmp_path / "nope.png"), *model],
        "empty": [str((tmp_path / "empty").mkdir() or tmp_path / "empty"), *model],
        "text": [str(tmp_path / "ok.txt"), *model],
        "corrupt": [str(tmp_path / "bad.jpg"), *model],
        "t2i": [str(image), "--model", str(ensure_tiny("diffusion"))],
        "unet": [str(image), "--model", str(ensure_tiny("diffusion") / "unet")],
        "untrained": [str(image), "--set", f"output_root={tmp_path}"],
        "noshards": [str(image), "--set", f"output_root={tmp_path}"],
        "guidance": [str(image), *model, "--image-guidance", "0.5"],
    }[case]
    (tmp_path / "ok.txt").write_text("x")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    if case == "untrained":  # the config has shards (its own index), but no training finished on them
        shards = write_synthetic_shards(str(tmp_path / "shards"), train_samples=2, val_samples=1)
        own = index_url(load_config("demo", [f"output_root={tmp_path}"]))
        Path(own).parent.mkdir(parents=True)
        Path(own).write_text(Path(shards).read_text())
    result = runner.invoke(app, ["edit", args[0], "make it blue", *args[1:]])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    if case in ("untrained", "noshards"):
        assert "editforge train --preset demo" in result.output
    assert not list(tmp_path.rglob("*.edited.png"))
