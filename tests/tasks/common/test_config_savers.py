"""The render savers nested under ``render.adaptive`` / ``render.early_reject``: the old flat keys are refused
with the new key's name, and every stage hash is the one the flat keys gave (a finished run's folders are
found again). The pinned hashes were computed on the tree before the savers were nested (commit 0c1026e)."""

import pytest

from tasks.common.config import FLAT_RENDER_SAVERS, ConfigError, load_config
from tasks.registry import chain, stage_hash

BEFORE_NESTING = {
    "demo": {
        "captions": "6526c4e3f7a17a50",
        "finetune": "725dff6847b22650",
        "text": "79323d6267239775",
        "render": "378deab4fb4223b9",
        "judge": "2960bf9d4a56ef3d",
        "filter": "f0de0c2ea0692a75",
        "pack": "cb584243b98e64b0",
    },
    "paper": {
        "captions": "6526c4e3f7a17a50",
        "finetune": "b858689096f0cc2b",
        "text": "80f2d3208033c7c2",
        "render": "44018ee4f6957421",
        "judge": "9430b851a5fe5b44",
        "filter": "a6abc39d27d5c659",
        "pack": "a03189172a1b3cee",
    },
    # the world preset re-pinned when its models were rebuilt (world v2: the weights' sha256 enter its hashes)
    # and when its CLIP thresholds were recalibrated on v2 (0.68/0.22/0.28: render and every stage after it)
    # and when its LM was rebuilt with the faster loss (fine-tune and every stage after it)
    "world": {
        "captions": "6526c4e3f7a17a50",
        "finetune": "6ddd4e6ca5a960a2",
        "text": "0231aeafb3a0ef6a",
        "render": "3f4a048b287d772d",
        "judge": "fd98dc0b9b3d6198",
        "filter": "abf15393d0477f18",
        "pack": "2155de9d611b3b40",
    },
}
# every saver away from its default: before nesting, render.adaptive=true render.round_size=4 ... as flat keys
EVERY_SAVER = [
    "render.adaptive.enabled=true",
    "render.adaptive.round_size=4",
    "render.adaptive.target_passed=3",
    "render.adaptive.give_up_after=16",
    "render.early_reject.at=0.3",
    "render.early_reject.margin=0.02",
    "render.early_reject.dry_run=true",
    "render.early_reject.metrics=[clip_sim_dir]",
]
EVERY_SAVER_BEFORE = {
    "demo": ("b737221b418ac483", "59246a0bbeed3767"),  # (render, pack)
    "paper": ("e3228aaa09932911", "bc9543697c033d75"),
    "world": ("40b36eea968bd926", "4dbde841cb4ee7d4"),  # world v2, thresholds 0.68/0.22/0.28 (see above)
}


@pytest.mark.parametrize("preset", sorted(BEFORE_NESTING))
def test_stage_hashes_are_those_of_the_flat_keys(preset):
    cfg = load_config(preset)
    assert {s.name: stage_hash(cfg, s.name) for s in chain()} == BEFORE_NESTING[preset]
    every = load_config(preset, EVERY_SAVER)
    assert (stage_hash(every, "render"), stage_hash(every, "pack")) == EVERY_SAVER_BEFORE[preset]


def test_render_hashes_the_savers_under_their_flat_names():
    fields = load_config("demo", EVERY_SAVER).render.output_fields()
    assert "early_reject" not in fields
    assert {old: fields[old] for old in FLAT_RENDER_SAVERS} == {
        "adaptive": True,
        "round_size": 4,
        "target_passed": 3,
        "give_up_after": 16,
        "early_reject_at": 0.3,
        "early_reject_margin": 0.02,
        "early_reject_dry_run": True,
        "early_reject_metrics": ["clip_sim_dir"],
    }


MOVES = [
    (f"render.{old}", f"render.{section}.{field}") for old, (section, field) in FLAT_RENDER_SAVERS.items()
]


@pytest.mark.parametrize("old, new", MOVES)
def test_an_old_key_is_refused_naming_the_new_one(tmp_path, old, new):
    flag = old.endswith(("adaptive", "dry_run"))
    value = "[clip_sim_dir]" if old.endswith("metrics") else "true" if flag else "2"
    with pytest.raises(ConfigError, match=rf"^override '{old}': {old} is now {new} "):
        load_config("demo", [f"{old}={value}"])
    preset = tmp_path / "mine.yaml"
    preset.write_text(f"render:\n  steps: 4\n  {old.removeprefix('render.')}: {value}\n")
    with pytest.raises(ConfigError, match=rf"^{preset}: {old} is now {new} "):
        load_config(str(preset))
    with pytest.raises(ConfigError, match=f"{old} is now {new}"):  # a whole section given on the command line
        load_config("demo", [f"render={{steps: 4, {old.removeprefix('render.')}: {value}}}"])


def test_the_nested_keys_set_the_savers():
    cfg = load_config("demo", ["render.adaptive.give_up_after=4", "render.early_reject.dry_run=true"])
    assert cfg.render.adaptive.enabled and cfg.render.adaptive.round_size == 2  # the demo's, kept
    assert cfg.render.adaptive.give_up_after == 4 and cfg.render.early_reject.dry_run
    assert cfg.render.early_reject.at == 0.5 and cfg.render.early_reject.margin == 0.1
