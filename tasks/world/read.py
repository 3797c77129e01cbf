"""Read a world image back from its pixels, and tell whether a rendered pair is the edit its captions say.

Torch-free and independent of every trained model (the CLIP filter included), so it can label rendered
pairs for a review or a filter calibration. :func:`read_image` assigns each pixel to the nearest colour
of the world's palette (:data:`tasks.world.scene.COLOURS`, :data:`~tasks.world.scene.BACKGROUNDS`),
(a pixel whose four neighbours are not all of its colour counts for none: edges blend colours), takes the
background from the image border and reports the shape colours that cover enough pixels.
:func:`judge_pair` reads both images of a pair and checks, for the edit kind of its captions
(:func:`tasks.world.grammar.edit_kind`), that

- the before image shows the input caption (its background, each shape colour present) and the after
  image the output caption;
- the edit happened: the new colour, shape or background is there, the removed colour is gone;
- the rest stayed: the shapes the edit does not touch cover the same pixels in both images (IoU of
  their colour masks at least ``MIN_KEPT_IOU``; for ``background`` and ``style`` edits, of the shapes'
  footprint, grown by 3 pixels).

Style itself (flat, outlined, striped) is not read: a ``style`` pair passes when background and layout
stayed and the images differ inside the shapes. Verdicts are only as good as the palette reading;
blurred or off-colour renders fail the "shows its caption" checks, which is the point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.world.grammar import Description, edit_kind, parse_caption
from tasks.world.scene import BACKGROUNDS, COLOURS

MIN_PIXELS = 6  # a shape colour counts as present from this many (inner) pixels (64² image; a small shape has ~250)
MAX_DISTANCE = 80.0  # RGB distance beyond which a pixel is no palette colour
MIN_KEPT_IOU = 0.5
MIN_NEW_PIXELS = 40  # an added / removed shape changes at least this many pixels (a small one: ~250)
MIN_STYLE_CHANGE = 0.04  # mean absolute pixel change inside the shapes for a style edit ([0, 1] units)
_NAMES = sorted(set(COLOURS) | set(BACKGROUNDS))
_RGB = np.array([COLOURS.get(n, BACKGROUNDS.get(n)) for n in _NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Reading:
    background: str
    colours: dict[str, int]  # shape colour -> pixels (background colour and unclassified pixels left out)
    labels: np.ndarray = field(repr=False, compare=False)  # (H, W) palette name index, -1: none

    def mask(self, colour: str) -> np.ndarray:
        return self.labels == _NAMES.index(colour)

    def foreground(self) -> np.ndarray:
        return (self.labels != _NAMES.index(self.background)) & (self.labels >= 0)


def _uint8(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:  # (3, H, W) tensor layout
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return a


def read_image(image) -> Reading:
    """The palette reading of one image: (H, W, 3) uint8, or float in [0, 1] (also (3, H, W))."""
    a = _uint8(image).astype(np.float64)
    dist = np.linalg.norm(a[:, :, None, :] - _RGB[None, None], axis=-1)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > MAX_DISTANCE] = -1
    # a pixel between two colours blends them (anti-aliasing, blur): it counts for no colour
    padded = np.pad(labels, 1, mode="edge")
    h, w = labels.shape
    alike = np.all([padded[1 + di: 1 + di + h, 1 + dj: 1 + dj + w] == labels
                    for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))], axis=0)
    labels = np.where(alike, labels, -1)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border = border[border >= 0]
    counts = np.bincount(border, minlength=len(_NAMES)) if len(border) else np.zeros(len(_NAMES), int)
    backgrounds = [i for i, n in enumerate(_NAMES) if n in BACKGROUNDS]
    background = _NAMES[max(backgrounds, key=lambda i: counts[i])]
    colours = {}
    for i, name in enumerate(_NAMES):
        n = int((labels == i).sum())
        if name in COLOURS and name != background and n >= MIN_PIXELS:
            colours[name] = n
    return Reading(background, colours, labels)


def _footprint(reading: Reading, grow: int = 3) -> np.ndarray:
    """The foreground grown by ``grow`` pixels: a shape's area whatever its style (an outline, stripes of the
    background's colour) and a few pixels of blur."""
    mask = reading.foreground()
    for _ in range(grow):
        padded = np.pad(mask, 1)
        mask = np.max([padded[i: i + mask.shape[0], j: j + mask.shape[1]] for i in range(3) for j in range(3)], axis=0)
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@dataclass(frozen=True)
class PairVerdict:
    real_edit: bool
    kind: str  # the captions' edit kind (grammar.edit_kind)
    reasons: tuple[str, ...]  # why not (empty when real_edit)


def shows(reading: Reading, description: Description) -> list[str]:
    """What the image misses of the description (empty: it shows it)."""
    missing = []
    if reading.background != description.background:
        missing.append(f"background {reading.background}, not {description.background}")
    for _kind, colour, _size in description.shapes:
        if colour != description.background and colour not in reading.colours:
            missing.append(f"no {colour} shape")
    return missing


def judge_pair(before, after, input_caption: str, output_caption: str) -> PairVerdict:
    """Is (before, after) the world edit from ``input_caption`` to ``output_caption``? (see the module doc)"""
    kind = edit_kind(input_caption, output_caption)
    a, b = parse_caption(input_caption), parse_caption(output_caption)
    if a is None or b is None or kind in ("unparseable", "none", "other"):
        return PairVerdict(False, kind, (f"captions are no single world edit ({kind})",))
    r0, r1 = read_image(before), read_image(after)
    reasons = [f"before: {m}" for m in shows(r0, a)] + [f"after: {m}" for m in shows(r1, b)]
    ka, kb = a.by_kind(), b.by_kind()
    touched = {k for k in ka.keys() | kb.keys() if ka.get(k) != kb.get(k)}
    touched_colours = {ka[k][0] for k in touched if k in ka} | {kb[k][0] for k in touched if k in kb}
    untouched_colours = {ka[k][0] for k in ka.keys() & kb.keys() if k not in touched}
    # striped shapes carry white or black stripes: those two colours say nothing about which shapes are there
    stripes = {"white", "black"} if "striped" in (a.style, b.style) else set()
    if kind != "style":  # a style edit changes every shape's pixels: only its footprint must stay (below)
        for colour in sorted(untouched_colours - touched_colours - stripes - {a.background, b.background}):
            iou = _iou(r0.mask(colour), r1.mask(colour))
            if iou < MIN_KEPT_IOU:
                reasons.append(f"the {colour} shape moved or changed (IoU {iou:.2f})")
    if kind == "colour":
        (k,) = touched
        old, new = ka[k][0], kb[k][0]
        if old not in untouched_colours | stripes and old in r1.colours:
            reasons.append(f"the {old} shape is still {old}")
        recoloured = r1.mask(new) & ~r0.mask(new)
        if recoloured.sum() and (recoloured & r0.mask(old)).sum() / recoloured.sum() < MIN_KEPT_IOU:
            reasons.append(f"the {new} shape is not where the {old} one was")
    elif kind == "add":
        if (r1.foreground() & ~r0.foreground()).sum() < MIN_NEW_PIXELS:
            reasons.append("nothing was added")
    elif kind == "remove":
        (k,) = touched
        if ka[k][0] not in untouched_colours | stripes and ka[k][0] in r1.colours:
            reasons.append(f"the {ka[k][0]} {k} is still there")
        if (r0.foreground() & ~r1.foreground()).sum() < MIN_NEW_PIXELS:
            reasons.append("nothing was removed")
    elif kind in ("background", "style"):
        # an outline covers ~half of its filled shape: a style edit keeps a looser footprint
        if _iou(_footprint(r0), _footprint(r1)) < MIN_KEPT_IOU:
            reasons.append("the shapes moved")
        if kind == "style":
            inside = r0.foreground() | r1.foreground()
            diff = np.abs(_uint8(before).astype(float) - _uint8(after).astype(float)).mean(-1) / 255.0
            if not inside.any() or diff[inside].mean() < MIN_STYLE_CHANGE:
                reasons.append("no change inside the shapes")
    return PairVerdict(not reasons, kind, tuple(reasons))
