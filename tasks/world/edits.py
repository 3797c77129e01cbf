"""Edit triplets over world scenes, in the paper's (input caption, edit instruction, output caption) form.

Five kinds of edit (:data:`EDIT_KINDS`), each applied to the scene itself, so every triplet comes with
its before and after scenes (the same positions: a ground-truth pair):

- ``colour``: one shape takes another colour (``make the circle blue``);
- ``add``: a new shape of a kind not in the scene, at a free place (``add a small yellow triangle``);
- ``remove``: one of two or three shapes goes (``remove the square``);
- ``background``: another background colour (``make the background pink``);
- ``style``: another style for every shape (``make it striped``).

A scene has at most one shape of each kind, so ``the circle`` names one shape. Everything is a pure
function of ``(seed, index)``; :func:`sample_triplet` picks the kind uniformly among those that apply
(no ``add`` to a full scene, no ``remove`` of the only shape).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tasks.world.scene import (
    BACKGROUNDS,
    COLOURS,
    MAX_SHAPES,
    STYLES,
    Scene,
    article,
    caption,
    colour_ok,
    random_shape,
    rng_for,
    sample_scene,
    with_shapes,
)

EDIT_KINDS = ("colour", "add", "remove", "background", "style")

TEMPLATES = {
    "colour": (
        "make the {kind} {colour}",
        "turn the {kind} {colour}",
        "change the colour of the {kind} to {colour}",
        "paint the {kind} {colour}",
    ),
    "add": ("add {phrase}", "put {phrase} in the picture", "draw {phrase} too", "add {phrase} to the image"),
    "remove": ("remove the {kind}", "take away the {kind}", "delete the {kind}", "get rid of the {kind}"),
    "background": (
        "make the background {background}",
        "change the background to {background}",
        "put the shapes on {a_background} {background} background",
        "paint the background {background}",
    ),
    "style": (
        "make it {style}",
        "change the style to {style}",
        "make the shapes {style}",
        "turn it into {style} style",
    ),
}


@dataclass(frozen=True)
class WorldTriplet:
    input: str
    edit: str
    output: str
    kind: str
    before: Scene
    after: Scene

    def as_row(self) -> dict:
        return {"input": self.input, "edit": self.edit, "output": self.output, "kind": self.kind}


def applicable(scene: Scene) -> list[str]:
    kinds = []
    for kind in EDIT_KINDS:
        if kind == "add" and len(scene.shapes) >= MAX_SHAPES:
            continue
        if kind == "remove" and len(scene.shapes) < 2:
            continue
        if kind == "background" and not _backgrounds(scene):
            continue
        kinds.append(kind)
    return kinds


def _backgrounds(scene: Scene) -> list[str]:
    return [
        b for b in BACKGROUNDS if b != scene.background and all(colour_ok(s.colour, b) for s in scene.shapes)
    ]


def apply_edit(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[Scene, dict] | None:
    """The edited scene and the words of its instruction, or None when ``kind`` cannot apply here."""
    shapes = scene.shapes
    if kind == "colour":
        target = shapes[int(rng.integers(len(shapes)))]
        colours = [c for c in COLOURS if c != target.colour and colour_ok(c, scene.background)]
        colour = colours[int(rng.integers(len(colours)))]
        new = tuple(replace(s, colour=colour) if s is target else s for s in shapes)
        return with_shapes(scene, new), {"kind": target.kind, "colour": colour}
    if kind == "add":
        if len(shapes) >= MAX_SHAPES:
            return None
        added = random_shape(rng, scene.background, shapes)
        if added is None:
            return None
        return with_shapes(scene, shapes + (added,)), {"phrase": added.phrase()}
    if kind == "remove":
        if len(shapes) < 2:
            return None
        target = shapes[int(rng.integers(len(shapes)))]
        return with_shapes(scene, tuple(s for s in shapes if s is not target)), {"kind": target.kind}
    if kind == "background":
        options = _backgrounds(scene)
        if not options:
            return None
        background = options[int(rng.integers(len(options)))]
        return with_shapes(scene, shapes, background=background), {
            "background": background,
            "a_background": article(background),
        }
    if kind == "style":
        styles = [s for s in STYLES if s != scene.style]
        style = styles[int(rng.integers(len(styles)))]
        return with_shapes(scene, shapes, style=style), {"style": style}
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")


def make_triplet(scene: Scene, kind: str, rng: np.random.Generator) -> WorldTriplet | None:
    edited = apply_edit(scene, kind, rng)
    if edited is None:
        return None
    after, words = edited
    templates = TEMPLATES[kind]
    instruction = templates[int(rng.integers(len(templates)))].format(**words)
    return WorldTriplet(caption(scene), instruction, caption(after), kind, scene, after)


def sample_triplet(seed: int, index: int, kind: str | None = None) -> WorldTriplet:
    """Triplet ``index`` of the world with ``seed``: on scene ``(seed, index)``, an edit of ``kind`` (or of a
    kind drawn among those that apply). A ``kind`` that cannot apply to that scene moves on to the next
    scene index that takes it (deterministically)."""
    for step in range(1000):
        scene = sample_scene(seed, index + step * 1_000_003)
        rng = rng_for(seed, index, step, 7)
        kinds = applicable(scene)
        choice = kind if kind is not None else kinds[int(rng.integers(len(kinds)))]
        if choice in kinds and (triplet := make_triplet(scene, choice, rng)) is not None:
            return triplet
    raise RuntimeError(f"no {kind} edit found for world triplet {index}")


def sample_triplets(seed: int, n: int, start: int = 0, kind: str | None = None) -> list[WorldTriplet]:
    return [sample_triplet(seed, start + i, kind) for i in range(n)]


def wrong_edit(triplet: WorldTriplet, seed: int) -> WorldTriplet:
    """Another edit of the same input scene, of a different kind (for 'does the metric rank the right
    edit first' checks): same before scene, another after."""
    rng = rng_for(seed, 91)
    kinds = [k for k in applicable(triplet.before) if k != triplet.kind]
    for k in (kinds[int(i)] for i in rng.permutation(len(kinds))):
        if (other := make_triplet(triplet.before, k, rng)) is not None:
            return other
    raise RuntimeError("no other edit applies to this scene")
