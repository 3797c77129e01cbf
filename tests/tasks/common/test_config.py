import pytest

from tasks.common.config import ConfigError, load_config, preset_names


def test_presets_load_and_differ():
    assert {"demo", "paper"} <= set(preset_names())
    demo, paper = load_config("demo"), load_config("paper")
    assert paper.render.steps == 100 and paper.render.samples_per_triplet == 100
    assert paper.filter.clip_image_threshold == 0.75 and paper.filter.top_k == 4
    assert demo.models.diffusion == "tiny"


def test_override_changes_value_and_hash():
    base = load_config("demo")
    changed = load_config("demo", ["render.steps=3"])
    assert changed.render.steps == 3
    assert changed.stage_hash("render") != base.stage_hash("render")
    # upstream stages are unaffected, downstream ones follow
    assert changed.stage_hash("text") == base.stage_hash("text")
    assert changed.stage_hash("pack") != base.stage_hash("pack")


def test_hash_is_stable_across_loads():
    assert load_config("demo").stage_hash("pack") == load_config("demo").stage_hash("pack")


def test_top_k_does_not_invalidate_render():
    # with fixed-N sampling (the paper's), top-k is a pure re-selection from samples.parquet
    base = load_config("demo", ["render.adaptive=false"])
    other = load_config("demo", ["render.adaptive=false", "filter.top_k=1"])
    assert base.stage_hash("render") == other.stage_hash("render")
    assert base.stage_hash("filter") != other.stage_hash("filter")


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
    assert base.stage_hash("text") == faster.stage_hash("text")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"input": "a cat", "edit": "make it a dog", "output": "a dog"}\n')
    other = load_config("demo", [f"text.seed_annotations={seeds}"])
    assert other.stage_hash("text") != base.stage_hash("text")
    assert other.stage_hash("render") != base.stage_hash("render")


def test_adaptive_render_hash_follows_top_k_it_stops_at():
    adaptive = ["render.adaptive=true"]
    a = load_config("demo", adaptive)
    b = load_config("demo", [*adaptive, "filter.top_k=1"])
    assert a.stage_hash("render") != b.stage_hash("render")
    fixed = load_config("demo", [*adaptive, "render.target_passed=2"])
    fixed_k = load_config("demo", [*adaptive, "render.target_passed=2", "filter.top_k=1"])
    assert fixed.stage_hash("render") == fixed_k.stage_hash("render")
