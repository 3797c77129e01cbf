"""A procedurally drawn world: a few shapes on a plain background, in one style, and their captions.

Torch-free (PIL + numpy) and deterministic: a scene is a pure function of ``(seed, index)``
(:func:`sample_scene`), an image a pure function of the scene (:func:`draw`), a caption too
(:func:`caption`). A scene holds 1-3 shapes of different kinds, each with a colour, a size (``small``
or regular) and a position; one background colour; one style for all shapes:

    a red circle and a small blue square on a green background, flat style

Shapes are listed left to right (by their centre's x), so a caption pins the order of the shapes but
not their exact positions: those are the image's own (an edit keeps them). Images are drawn at
``SUPERSAMPLE`` times the size and box-filtered down (anti-aliased edges, same bytes on every machine
with the same Pillow).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

WORLD_IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross")
# shape colours (RGB); every background differs from the shapes on it
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (222, 38, 38),
    "orange": (245, 138, 18),
    "yellow": (246, 214, 32),
    "green": (36, 168, 64),
    "blue": (38, 82, 224),
    "purple": (138, 52, 196),
    "white": (246, 246, 246),
    "black": (18, 18, 18),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 246),
    "gray": (128, 128, 128),
    "black": (18, 18, 18),
    "green": (36, 168, 64),
    "blue": (38, 82, 224),
    "pink": (246, 160, 196),
}
STYLES = ("flat", "outlined", "striped")
SIZES = ("small", "regular")
# radius as a share of the image side, and outline / stripe widths
# (large enough for a 16² latent: a small shape spans ~4 latent pixels, a stripe or an outline ~1)
RADIUS = {"small": 0.14, "regular": 0.22}
OUTLINE = 0.07
STRIPE_PERIOD = 0.1875  # bands 6 px wide at 64²
MAX_SHAPES = 3
MIN_CONTRAST = 90.0  # a shape colour at least this far (RGB distance) from its background


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    x: float  # centre, as a share of the image side
    y: float

    @property
    def radius(self) -> float:
        return RADIUS[self.size]

    def phrase(self) -> str:
        """``a small red circle``, ``an orange square``."""
        words = ([] if self.size == "regular" else [self.size]) + [self.colour, self.kind]
        return f"{article(words[0])} {' '.join(words)}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    style: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def ordered(self) -> tuple[Shape, ...]:
        return tuple(sorted(self.shapes, key=lambda s: (s.x, s.y)))

    def shape(self, kind: str) -> Shape:
        return next(s for s in self.shapes if s.kind == kind)

    def kinds(self) -> set[str]:
        return {s.kind for s in self.shapes}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def colour_ok(colour: str, background: str) -> bool:
    return contrast(COLOURS[colour], BACKGROUNDS[background]) >= MIN_CONTRAST


def caption(scene: Scene) -> str:
    """The scene's one caption: shapes left to right, then background and style."""
    phrases = [s.phrase() for s in scene.ordered()]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed} on {article(scene.background)} {scene.background} background, {scene.style} style"


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """The generator of one item: numpy's PCG64 seeded with (seed, *key), the same on every platform."""
    return np.random.default_rng([int(seed), *(int(k) for k in key)])


def free_position(
    rng: np.random.Generator, size: str, others: tuple[Shape, ...], tries: int = 200
) -> tuple[float, float] | None:
    """A centre where a ``size`` shape fits inside the image and overlaps none of ``others`` (None if none found)."""
    r = RADIUS[size]
    for _ in range(tries):
        x, y = (round(float(v), 4) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
        if all(np.hypot(x - o.x, y - o.y) >= r + o.radius + 0.04 for o in others):
            return x, y
    return None


def random_shape(
    rng: np.random.Generator, background: str, others: tuple[Shape, ...], kinds: tuple[str, ...] = SHAPES
) -> Shape | None:
    """A new shape of a kind not in ``others``, a colour that shows on ``background``, at a free place."""
    free_kinds = [k for k in kinds if k not in {o.kind for o in others}]
    colours = [c for c in COLOURS if colour_ok(c, background)]
    if not free_kinds:
        return None
    kind = free_kinds[int(rng.integers(len(free_kinds)))]
    colour = colours[int(rng.integers(len(colours)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    place = free_position(rng, size, others)
    if place is None:
        return None
    return Shape(kind, colour, size, *place)


def sample_scene(seed: int, index: int) -> Scene:
    """Scene ``index`` of the world with ``seed``: 1 shape (40%), 2 (45%) or 3 (15%)."""
    rng = rng_for(seed, index)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    style = STYLES[int(rng.integers(len(STYLES)))]
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.45, 0.15]))
    shapes: tuple[Shape, ...] = ()
    for _ in range(n):
        shape = random_shape(rng, background, shapes)
        if shape is not None:
            shapes += (shape,)
    return Scene(shapes, background, style, meta={"seed": int(seed), "index": int(index)})


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        h = r * 0.86
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)]
    if kind == "cross":
        a, b = r, r * 0.36
        return [
            (cx - b, cy - a),
            (cx + b, cy - a),
            (cx + b, cy - b),
            (cx + a, cy - b),
            (cx + a, cy + b),
            (cx + b, cy + b),
            (cx + b, cy + a),
            (cx - b, cy + a),
            (cx - b, cy + b),
            (cx - a, cy + b),
            (cx - a, cy - b),
            (cx - b, cy - b),
        ]
    raise ValueError(f"unknown shape {kind!r}")


def _shape_mask(shape: Shape, side: int, outline: int | None = None) -> Image.Image:
    """An ``L`` mask of the shape at ``side`` pixels (the outline only, ``outline`` px wide, when given)."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = shape.x * side, shape.y * side, shape.radius * side
    if shape.kind == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        if outline:
            draw.ellipse(box, outline=255, width=outline)
        else:
            draw.ellipse(box, fill=255)
    else:
        points = _polygon(shape.kind, cx, cy, r)
        if outline:
            draw.polygon(points, outline=255, width=outline)
        else:
            draw.polygon(points, fill=255)
    return mask


def _stripe_colour(colour: str) -> tuple[int, int, int]:
    """The second colour of a striped shape: white stripes, black ones on a light shape."""
    rgb = COLOURS[colour]
    return (18, 18, 18) if sum(rgb) > 600 else (246, 246, 246)


def draw(scene: Scene, size: int = WORLD_IMAGE_SIZE) -> Image.Image:
    """The scene's RGB image, ``size`` x ``size``."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    ys = np.arange(side)[:, None]
    period = max(2, int(round(STRIPE_PERIOD * side)))
    stripes = np.broadcast_to(((ys // (period // 2)) % 2 == 1), (side, side))
    for shape in scene.shapes:
        if scene.style == "outlined":
            mask = _shape_mask(shape, side, outline=max(1, int(round(OUTLINE * side))))
            image.paste(COLOURS[shape.colour], (0, 0), mask)
            continue
        mask = _shape_mask(shape, side)
        image.paste(COLOURS[shape.colour], (0, 0), mask)
        if scene.style == "striped":
            band = np.where(stripes, np.asarray(mask), 0).astype(np.uint8)
            image.paste(_stripe_colour(shape.colour), (0, 0), Image.fromarray(band, mode="L"))
    return image.resize((size, size), Image.Resampling.BOX)


def image_array(scene: Scene, size: int = WORLD_IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8."""
    return np.asarray(draw(scene, size), dtype=np.uint8)


def relayout(scene: Scene, rng: np.random.Generator, tries: int = 50) -> Scene:
    """The same shapes at new free places, in the same left-to-right order: another picture with the same
    caption (the scene itself when no such placement is found in ``tries``)."""
    for _ in range(tries):
        shapes: tuple[Shape, ...] = ()
        for s in scene.shapes:
            place = free_position(rng, s.size, shapes)
            if place is None:
                break
            shapes += (replace(s, x=place[0], y=place[1]),)
        moved = with_shapes(scene, shapes)
        if len(shapes) == len(scene.shapes) and caption(moved) == caption(scene):
            return moved
    return scene


def with_shapes(scene: Scene, shapes: tuple[Shape, ...], **changes) -> Scene:
    return replace(scene, shapes=shapes, meta={}, **changes)
