"""The synthetic world (torch-free): deterministic scenes, captions that parse back, edits that do what they say,
and the shipped captions parquet and seed triplets equal to what their builder writes."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from seed_annotations.schema import load_triplets
from tasks.captions.laion import read_captions, resolve_sources
from tasks.common.config import CaptionsConfig, load_config
from tasks.common.contract import Stats
from tasks.world import data
from tasks.world.edits import EDIT_KINDS, sample_triplet, sample_triplets, wrong_edit
from tasks.world.grammar import edit_kind, parse_caption
from tasks.world.scene import BACKGROUNDS, caption, draw, image_array, sample_scene


def test_scenes_images_and_captions_are_pure_functions_of_seed_and_index():
    a, b = sample_scene(3, 41), sample_scene(3, 41)
    assert a == b and caption(a) == caption(b)
    assert draw(a).tobytes() == draw(b).tobytes()
    assert caption(sample_scene(3, 42)) != caption(a) or sample_scene(3, 42) != a
    assert image_array(a).shape == (64, 64, 3)


def test_captions_parse_back_and_list_shapes_left_to_right():
    for i in range(200):
        scene = sample_scene(0, i)
        described = parse_caption(caption(scene))
        assert described is not None, caption(scene)
        assert [k for k, _, _ in described.shapes] == [s.kind for s in scene.ordered()]
        assert (described.background, described.style) == (scene.background, scene.style)
    assert parse_caption("a red circle and a small blue square on a green background, flat style").shapes == (
        ("circle", "red", "regular"),
        ("square", "blue", "small"),
    )
    assert parse_caption("a golden retriever on a porch") is None
    assert parse_caption("a red circle and a blue circle on a green background, flat style") is None


def test_every_edit_kind_occurs_and_is_what_the_captions_say():
    triplets = sample_triplets(0, 400)
    kinds = Counter(t.kind for t in triplets)
    assert set(kinds) == set(EDIT_KINDS) and min(kinds.values()) >= 30  # remove needs two shapes: the rarest
    for t in triplets:
        assert edit_kind(t.input, t.output) == t.kind, t
        assert caption(t.before) == t.input and caption(t.after) == t.output
    forced = sample_triplet(0, 7, "remove")
    assert forced.kind == "remove" and len(forced.before.shapes) >= 2


def test_an_edit_keeps_the_rest_of_the_scene():
    t = sample_triplet(0, 5, "background")
    before, after = image_array(t.before).astype(int), image_array(t.after).astype(int)
    bg = np.all(before == BACKGROUNDS[t.before.background], axis=-1)
    assert bg.mean() > 0.5 and np.all(after[bg] == BACKGROUNDS[t.after.background])
    assert np.array_equal(before[~bg & np.all(after == before, -1)], after[~bg & np.all(after == before, -1)])
    style = sample_triplet(0, 9, "style")
    assert [(s.kind, s.colour, s.x) for s in style.before.shapes] == [
        (s.kind, s.colour, s.x) for s in style.after.shapes
    ]
    other = wrong_edit(t, seed=0)
    assert other.input == t.input and other.kind != t.kind


def test_shipped_captions_parquet_is_the_builders_and_reads_as_a_laion_source(tmp_path):
    shipped = pq.read_table(data.captions_path())
    assert shipped.equals(data.captions_table())
    (url,) = resolve_sources("builtin:world")
    stats = Stats()
    df = read_captions([url], CaptionsConfig(), stats)
    assert len(df) == len(set(shipped.column("TEXT").to_pylist()))  # repeated captions counted as duplicates
    assert stats.rejected.get("duplicate_caption", 0) == shipped.num_rows - len(df)
    row = df.iloc[0]
    assert caption(data.scene_of_url(row["url"])) == row["text"]


def test_shipped_seed_triplets_are_the_builders_and_load_as_seed_annotations():
    assert data.seeds_path().read_text(encoding="utf-8") == data.seeds_text(data.seed_rows())
    cfg = load_config("world")
    assert cfg.text.seed_annotations == "builtin:world"
    seeds = load_triplets(cfg.text.seed_annotations_path())
    kinds = Counter(edit_kind(s.input, s.output) for s in seeds)
    assert kinds == {k: data.SEEDS_PER_KIND for k in EDIT_KINDS}
    rows = [json.loads(line) for line in data.seeds_path().read_text().splitlines()]
    assert set(rows[0]) == {"input", "edit", "output"}


def test_unknown_builtin_seed_annotations_is_a_config_error():
    from tasks.common.config import ConfigError

    with pytest.raises(ConfigError, match="builtin:world"):
        load_config("demo", ["text.seed_annotations=builtin:nothing"])


def test_relayout_moves_the_shapes_and_keeps_the_caption():
    from tasks.world.scene import relayout, rng_for

    moved = 0
    for i in range(40):
        scene = sample_scene(0, i)
        other = relayout(scene, rng_for(0, i, 5))
        assert caption(other) == caption(scene)
        moved += [(s.x, s.y) for s in other.shapes] != [(s.x, s.y) for s in scene.shapes]
    assert moved >= 36


def test_the_world_tokenizer_keeps_clips_tokens_for_world_words_and_reads_any_text(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    from tasks.world.clip_text import build_world_tokenizer

    texts = [caption(sample_scene(0, i)) for i in range(100)]
    tok = build_world_tokenizer(tmp_path, texts)
    assert len(tok) < 1000 and tok.eos_token_id == len(tok) - 1  # open_clip pools at the argmax token id
    clip = SimpleTokenizer()
    for text in texts[:20]:
        ours = tok.convert_ids_to_tokens(tok(text).input_ids)
        assert ours[1:-1] == [clip.decoder[i] for i in clip.encode(text)]
    other = tok("a golden retriever on a porch").input_ids  # words the world never uses: smaller pieces
    # (CLIP's unknown token is its end token: none inside the text)
    assert (
        other[0] == tok.bos_token_id and other[-1] == tok.eos_token_id and tok.eos_token_id not in other[1:-1]
    )
