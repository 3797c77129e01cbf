import pytest

from tasks.common.config import ConfigError, load_config, preset_names
from tasks.registry import stage_hash


def test_presets_load_and_differ():
    assert {"demo", "paper"} <= set(preset_names())
    demo, paper = load_config("demo"), load_config("paper")
    assert paper.render.steps == 100 and paper.render.samples_per_triplet == 100
    assert paper.render.keep.clip_image_threshold == 0.75 and paper.render.keep.top_k == 4
    assert paper.selection() == paper.render.keep and paper.render.save_images == "kept"
    assert demo.models.diffusion == "tiny"


def test_override_changes_value_and_hash():
    base = load_config("demo")
    changed = load_config("demo", ["render.steps=3"])
    assert changed.render.steps == 3
    assert stage_hash(changed, "render") != stage_hash(base, "render")
    # upstream stages are unaffected, downstream ones follow
    assert stage_hash(changed, "text") == stage_hash(base, "text")
    assert stage_hash(changed, "pack") != stage_hash(base, "pack")


def test_hash_is_stable_across_loads():
    assert stage_hash(load_config("demo"), "pack") == stage_hash(load_config("demo"), "pack")


def test_top_k_does_not_invalidate_render():
    # with fixed-N sampling (the paper's), top-k is a pure re-selection from samples.parquet
    base = load_config("demo", ["render.adaptive.enabled=false"])
    other = load_config("demo", ["render.adaptive.enabled=false", "filter.top_k=1"])
    assert stage_hash(base, "render") == stage_hash(other, "render")
    assert stage_hash(base, "filter") != stage_hash(other, "filter")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("render.stepz=3", "render.stepz"),
        ("render.steps=abc", "render.steps"),
        ("captions.num_partitions=0", "captions.num_partitions"),
        ("bogus=1", "bogus"),
        ("render.p_range=[0.9, 0.1]", "p_range"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("demo", [override])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("demo", ["render.steps"])


def test_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("render:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))


def test_text_hash_ignores_operational_knobs_but_follows_seed_triplets(tmp_path):
    base = load_config("demo")
    faster = load_config("demo", ["text.openai.concurrency=8", "text.openai.max_retries=2"])
    assert stage_hash(base, "text") == stage_hash(faster, "text")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"input": "a cat", "edit": "make it a dog", "output": "a dog"}\n')
    other = load_config("demo", [f"text.seed_annotations={seeds}"])
    assert stage_hash(other, "text") != stage_hash(base, "text")
    assert stage_hash(other, "render") != stage_hash(base, "render")


def test_render_keep_owns_render_time_selection_and_filter_re_selects():
    adaptive = ["render.adaptive.enabled=true"]
    base = load_config("demo", adaptive)
    # render.keep decides what render passes, stops at and keeps: it is part of the render hash
    assert stage_hash(base, "render") != stage_hash(
        load_config("demo", [*adaptive, "render.keep.top_k=1"]), "render"
    )
    assert stage_hash(base, "render") != stage_hash(
        load_config("demo", ["render.keep.clip_direction_threshold=0.3"]), "render"
    )
    # filter.* only re-selects, whatever the savers: render is untouched, the filter follows
    stricter = load_config("demo", [*adaptive, "filter.top_k=1", "filter.clip_image_threshold=0.9"])
    assert stage_hash(stricter, "render") == stage_hash(base, "render")
    assert stage_hash(stricter, "filter") != stage_hash(base, "filter")
    assert stricter.selection().top_k == 1 and stricter.selection().clip_image_threshold == 0.9
    assert stricter.selection().clip_direction_threshold == base.render.keep.clip_direction_threshold
    # setting a filter field to the value it inherits is no change
    same = load_config("demo", [*adaptive, f"filter.top_k={base.render.keep.top_k}"])
    assert stage_hash(same, "filter") == stage_hash(base, "filter")
    with pytest.raises(ConfigError, match="save_images"):
        load_config("demo", ["render.save_images=some"])


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "render.keep.clip_image_threshold=1.5",
            "render.keep.clip_image_threshold: Input should be less than or equal to 1",
        ),
        (
            "filter.clip_direction_threshold=-7",
            "filter.clip_direction_threshold: Input should be greater than or equal to -1",
        ),
        ("render.p_range=[-0.5, 1.7]", "p_range [-0.5, 1.7]: p is the share of steps"),
        ("render.cfg_range=[0.5, 2]", "cfg_range [0.5, 2.0]: classifier-free guidance scales start at 1"),
        ("render.height=60", "render.height: Input should be a multiple of 8"),
        ("train.resolution=66", "train.resolution: Input should be a multiple of 8"),
        ("render.scheduler=eulr", "render.scheduler: Input should be 'euler_ancestral'"),
        ("render.device=gpu", "render.device: Value error, unknown device 'gpu'"),
        ("text.device=cuda0", "text.device: Value error, unknown device 'cuda0'"),
        ("name=my_run", "name: Value error, 'my_run' is not a valid run name"),
    ],
)
def test_settings_out_of_bounds_fail_at_load_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert needle in str(err.value)


def test_a_preset_file_without_output_root_writes_under_its_own_name(tmp_path):
    preset = tmp_path / "My_Experiment.yaml"
    preset.write_text("render:\n  steps: 3\n")
    cfg = load_config(str(preset))
    assert cfg.name == "my-experiment" and cfg.output_root == "runs/my-experiment"
    assert load_config(str(preset), ["name=other"]).output_root == "runs/other"
    with pytest.raises(ConfigError, match="expected a mapping"):
        (tmp_path / "list.yaml").write_text("- 1\n")
        load_config(str(tmp_path / "list.yaml"))
