"""Read world captions back into scene descriptions, and tell which edit turns one caption into another.

:func:`parse_caption` accepts exactly the captions :func:`tasks.world.scene.caption` writes (case,
spacing and a trailing full stop aside) and returns a :class:`Description` (shapes in caption order,
without positions), or None. :func:`edit_kind` compares the descriptions of an input and an output
caption and names the edit (one of :data:`tasks.world.edits.EDIT_KINDS`), ``other`` for a change that is
none of them (two things changed, a shape swapped for another), ``none`` for no change, or
``unparseable``. The text stage's generated triplets are classified this way (their edit kind is
what the edit does to the caption, not what the instruction says).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from tasks.world.scene import BACKGROUNDS, COLOURS, SHAPES, STYLES

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_PHRASE = re.compile(rf"^an? (?:(small) )?({_COLOUR}) ({_SHAPE})$")
_CAPTION = re.compile(rf"^(.+) on an? ({'|'.join(BACKGROUNDS)}) background, ({'|'.join(STYLES)}) style$")


@dataclass(frozen=True)
class Description:
    shapes: tuple[tuple[str, str, str], ...]  # (kind, colour, size) in caption order
    background: str
    style: str

    def by_kind(self) -> dict[str, tuple[str, str]]:
        return {kind: (colour, size) for kind, colour, size in self.shapes}


def parse_caption(text: str) -> Description | None:
    text = " ".join(text.strip().rstrip(".").split()).lower()
    match = _CAPTION.match(text)
    if not match:
        return None
    listed, background, style = match.groups()
    head, _, last = listed.rpartition(" and ")
    parts = ([p.strip() for p in head.split(",")] if head else []) + [last.strip()]
    shapes = []
    for part in parts:
        phrase = _PHRASE.match(part)
        if not phrase:
            return None
        small, colour, kind = phrase.groups()
        shapes.append((kind, colour, "small" if small else "regular"))
    if len({kind for kind, _, _ in shapes}) != len(shapes):
        return None  # the world never holds two shapes of a kind
    return Description(tuple(shapes), background, style)


def edit_kind(input_caption: str, output_caption: str) -> str:
    """The world edit between two captions (see the module doc)."""
    a, b = parse_caption(input_caption), parse_caption(output_caption)
    if a is None or b is None:
        return "unparseable"
    changes = Counter()
    if a.background != b.background:
        changes["background"] += 1
    if a.style != b.style:
        changes["style"] += 1
    ka, kb = a.by_kind(), b.by_kind()
    added, removed = kb.keys() - ka.keys(), ka.keys() - kb.keys()
    if added:
        changes["add"] += len(added)
    if removed:
        changes["remove"] += len(removed)
    for kind in ka.keys() & kb.keys():
        if ka[kind][0] != kb[kind][0]:
            changes["colour"] += 1
        if ka[kind][1] != kb[kind][1]:
            changes["size"] += 1
    if not changes:
        return "none"
    if sum(changes.values()) == 1 and "size" not in changes:
        return next(iter(changes))
    return "other"
