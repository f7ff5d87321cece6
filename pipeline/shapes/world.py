"""The shapes world: a procedural image world whose ground truth is known exactly.

Every scene is a deterministic function of its seed: 1-3 coloured objects of distinct
classes and colours on a textured grey background (noise, gradient or stripes), drawn with
anti-aliasing and allowed to overlap. Each object's *visible* mask is exact (later objects
occlude earlier ones).

The world is the bundled model's training data, the "real data" against which synthetic
data is judged, and the source of reference images for image-guided variations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from stages.prompt_words import NUMBER_WORDS, plural

CLASSES = ("circle", "square", "triangle", "star", "ring", "cross")
COLORS = {
    "red": (225, 35, 35),
    "green": (35, 185, 55),
    "blue": (40, 75, 230),
    "yellow": (240, 215, 30),
    "purple": (155, 45, 200),
    "orange": (250, 135, 20),
}
BACKGROUNDS = ("noise", "gradient", "stripes")
#: every word a caption can contain; the bundled tokenizer makes each one a single token
VOCABULARY = ("a", "and", "on") + CLASSES + tuple(COLORS) + BACKGROUNDS

SUPERSAMPLE = 4
#: scenes with seeds below this train the bundled model; evaluation uses seeds from here on
HELD_OUT_SEED = 1_000_000
MIN_VISIBLE = 0.55  # an object keeps at least this fraction of its own area visible


@dataclass
class WorldObject:
    cls: str
    color: str
    cx: float  # centre, in pixels
    cy: float
    size: float  # diameter of the circumscribed circle, in pixels
    angle: float  # degrees
    mask: np.ndarray | None = field(default=None, repr=False)  # visible mask, bool HxW

    @property
    def phrase(self) -> str:
        return f"a {self.color} {self.cls}"


@dataclass
class Scene:
    seed: int
    size: int
    background: str
    objects: list[WorldObject]
    image: np.ndarray  # uint8 HxWx3

    @property
    def caption(self) -> str:
        return caption_for([(o.color, o.cls) for o in self.objects], self.background)

    def semantic_mask(self) -> np.ndarray:
        """uint8 HxW: 0 background, 1 + class index for each visible object pixel."""
        sem = np.zeros((self.size, self.size), np.uint8)
        for o in self.objects:
            sem[o.mask] = CLASSES.index(o.cls) + 1
        return sem


def caption_for(pairs, background: str | None = None) -> str:
    """'a red circle and a blue star on stripes' from [(color, cls), ...]."""
    text = " and ".join(f"a {color} {cls}" for color, cls in pairs)
    return f"{text} on {background}" if background else text


STAR_INNER = 0.45  # the world's stars: inner (notch) radius as a fraction of the outer (point) radius


def shape_polygon(cls: str, cx: float, cy: float, size: float, angle: float, star_inner: float = STAR_INNER):
    """Outline of a class as a list of (x, y) points; circle and ring return None (ellipses).
    ``star_inner`` sets a star's notch radius (the world draws STAR_INNER; the oracle also fits fatter ones)."""
    r = size / 2
    a0 = math.radians(angle)

    def rot(points):
        c, s = math.cos(a0), math.sin(a0)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if cls == "square":
        h = r / math.sqrt(2)
        return rot([(-h, -h), (h, -h), (h, h), (-h, h)])
    if cls == "triangle":
        return rot([(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if cls == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * star_inner
            t = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(t), rad * math.sin(t)))
        return rot(pts)
    if cls == "cross":
        w = r * 0.36
        return rot([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r),
                    (-w, w), (-r, w), (-r, -w), (-w, -w)])
    return None


def draw_shape(draw: ImageDraw.ImageDraw, cls: str, cx: float, cy: float, size: float,
               angle: float, fill, star_inner: float = STAR_INNER) -> None:
    """Draw one class outline filled with ``fill`` (coordinates already in the canvas scale)."""
    r = size / 2
    if cls == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif cls == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ri = r * 0.55
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0 if isinstance(fill, int) else None)
    else:
        draw.polygon(shape_polygon(cls, cx, cy, size, angle, star_inner), fill=fill)


def shape_coverage(cls: str, cx: float, cy: float, size: float, angle: float, h: int, w: int,
                   star_inner: float = STAR_INNER) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (float32 HxW) of one shape on an h×w canvas."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    draw_shape(ImageDraw.Draw(canvas), cls, cx * s, cy * s, size * s, angle, 255, star_inner)
    small = canvas.resize((w, h), Image.BOX)
    return np.asarray(small, np.float32) / 255.0


def _background(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """Desaturated textured background, float32 HxWx3 in [0, 255]."""
    base = rng.uniform(70, 185)
    tint = rng.uniform(-10, 10, size=3)  # slight colour cast, far from the object palette
    if kind == "noise":
        coarse = rng.normal(0, 1, size=(8, 8)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse).resize((n, n), Image.BICUBIC), np.float32)
        fine = rng.normal(0, 1, size=(n, n)).astype(np.float32)
        lum = base + 22 * smooth + 6 * fine
    elif kind == "gradient":
        t = math.radians(rng.uniform(0, 360))
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / max(n - 1, 1) - 0.5
        lum = base + rng.uniform(50, 90) * (xx * math.cos(t) + yy * math.sin(t))
    elif kind == "stripes":
        t = math.radians(rng.uniform(0, 180))
        period = rng.uniform(0.12, 0.25) * n
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        phase = (xx * math.cos(t) + yy * math.sin(t)) / period
        lum = base + rng.uniform(18, 30) * np.sign(np.sin(2 * math.pi * phase))
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    img = lum[..., None] + tint[None, None, :]
    return np.clip(img, 0, 255)


def _composite(seed: int, size: int, background: str, img: np.ndarray, placed: list) -> Scene:
    """The scene of ``placed`` (object, coverage) pairs drawn in order onto ``img`` (float background);
    each object's mask is what stays visible of it."""
    for obj, cov in placed:
        rgb = np.array(COLORS[obj.color], np.float32)
        img = img * (1 - cov[..., None]) + rgb[None, None, :] * cov[..., None]
    for (obj, _), vis in zip(placed, _visible([m for _, m in placed])):
        obj.mask = vis
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Scene(seed=seed, size=size, background=background, objects=[o for o, _ in placed], image=image)


def render_scene(seed: int, size: int = 64, n_objects: int | None = None,
                 classes=None, colors=None, background: str | None = None,
                 recolor: dict[int, str] | None = None) -> Scene:
    """Render the scene for ``seed``. Optional arguments pin parts of it (for prompted renders).
    ``recolor`` maps object indices to colours they are drawn in instead: the same scene otherwise, pixel for
    pixel outside those objects (a perfect repaint of their outlines)."""
    rng = np.random.default_rng([seed, 0x5A17E5])
    if classes is not None:
        n_objects = len(classes)
    if n_objects is None:
        n_objects = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    classes = list(classes) if classes is not None else list(rng.choice(CLASSES, n_objects, replace=False))
    colors = list(colors) if colors is not None else list(rng.choice(list(COLORS), n_objects, replace=False))
    if background is None:
        background = str(rng.choice(BACKGROUNDS))
    img = _background(rng, background, size)

    placed: list[tuple[WorldObject, np.ndarray]] = []
    for cls, color in zip(classes, colors):
        for _attempt in range(50):
            obj_size = rng.uniform(0.34, 0.5) * size
            margin = obj_size / 2 + 1
            cx, cy = rng.uniform(margin, size - margin, 2)
            obj = WorldObject(str(cls), str(color), float(cx), float(cy), float(obj_size),
                              float(rng.uniform(0, 360)))
            cov = shape_coverage(obj.cls, obj.cx, obj.cy, obj.size, obj.angle, size, size)
            # every earlier object must stay mostly visible once this one is drawn on top
            occl = cov >= 0.5
            if all(((m >= 0.5) & ~occl & vis).sum() >= MIN_VISIBLE * (m >= 0.5).sum()
                   for (_, m), vis in zip(placed, _visible([m for _, m in placed]))):
                break
        placed.append((obj, cov))
    for index, color in (recolor or {}).items():
        if color not in COLORS:
            raise ValueError(f"unknown colour {color!r}; expected one of {tuple(COLORS)}")
        placed[index][0].color = color

    return _composite(seed, size, background, img, placed)


def _visible(coverages: list[np.ndarray]) -> list[np.ndarray]:
    """Visible (unoccluded) boolean masks, later shapes on top."""
    out = []
    for i, cov in enumerate(coverages):
        vis = cov >= 0.5
        for later in coverages[i + 1:]:
            vis &= later < 0.5
        out.append(vis)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Multi-instance scenes: 2-4 objects of one class (same or different colours), touching ones included.
# A separate random stream and separate functions: render_scene / caption_for / VOCABULARY are unchanged.

MULTI_STREAM = 0x3A1751  # seed-sequence word of multi-instance scenes (render_scene uses 0x5A17E5)
MULTI_MIN_VISIBLE = 0.7  # every instance keeps at least this fraction of its own area visible


def count_phrase(cls: str, colors: list[str]) -> str:
    """'a red circle', 'two red circles' (one colour), 'two circles, red and blue' (several colours)."""
    k = len(colors)
    if k == 1:
        return f"a {colors[0]} {cls}"
    if len(set(colors)) == 1:
        return f"{NUMBER_WORDS[k]} {colors[0]} {plural(cls)}"
    return f"{NUMBER_WORDS[k]} {plural(cls)}, " + ", ".join(colors[:-1]) + f" and {colors[-1]}"


def groups_of(objects) -> list[tuple[str, list[str]]]:
    """[(class, [colour of each instance])] in order of each class's first object."""
    groups: dict[str, list[str]] = {}
    for o in objects:
        groups.setdefault(o.cls, []).append(o.color)
    return list(groups.items())


def count_caption(objects, background: str | None = None) -> str:
    """The caption of a multi-instance scene: 'two red circles and a blue star on stripes'."""
    text = " and ".join(count_phrase(cls, colors) for cls, colors in groups_of(objects))
    return f"{text} on {background}" if background else text


def _placed_ok(cov: np.ndarray, placed: list[np.ndarray], min_visible: float) -> bool:
    """Every earlier coverage keeps ``min_visible`` of its area visible once ``cov`` is drawn on top."""
    occl = cov >= 0.5
    vis_all = _visible(placed)
    return all(((m >= 0.5) & ~occl & vis).sum() >= min_visible * (m >= 0.5).sum() for m, vis in zip(placed, vis_all))


def render_multi_scene(seed: int, size: int = 64, groups: list[tuple[str, int]] | None = None,
                       same_color: bool | None = None, touch: float = 0.5,
                       background: str | None = None) -> Scene:
    """A scene with several instances of one class (``render_scene`` never draws a class twice).

    ``groups``: [(class, count)] (default: one class with 2-4 instances, then one other class half the time,
    single). ``same_color``: all instances of a class share one colour (default: drawn per scene; a class
    drawn once gets its own colour). ``touch``: the chance that an instance is placed against an earlier
    instance of its class (touching or slightly overlapping; every instance keeps at least
    :data:`MULTI_MIN_VISIBLE` of its area visible). Objects' masks are the exact visible pixels; the
    scene's caption (:func:`count_caption`) says how many of each class: 'two red circles and a star'."""
    rng = np.random.default_rng([seed, MULTI_STREAM])
    if groups is None:
        main = str(rng.choice(CLASSES))
        groups = [(main, int(rng.integers(2, 5)))]
        if rng.random() < 0.5:
            groups.append((str(rng.choice([c for c in CLASSES if c != main])), 1))
    if same_color is None:
        same_color = bool(rng.random() < 0.5)
    if background is None:
        background = str(rng.choice(BACKGROUNDS))
    img = _background(rng, background, size)
    palette = list(COLORS)
    free = [str(c) for c in rng.permutation(palette)]
    specs: list[tuple[str, str]] = []
    for cls, count in groups:
        if same_color or count == 1:
            color = free.pop(0) if free else str(rng.choice(palette))
            specs += [(cls, color)] * count
        else:
            specs += [(cls, free.pop(0) if free else str(rng.choice(palette))) for _ in range(count)]
    n = len(specs)
    lo, hi = (0.3, 0.42) if n <= 3 else (0.24, 0.34)
    placed: list[tuple[WorldObject, np.ndarray]] = []
    for cls, color in specs:
        mates = [o for o, _ in placed if o.cls == cls]
        want_touch = bool(mates) and rng.random() < touch
        for _attempt in range(100):
            obj_size = rng.uniform(lo, hi) * size
            margin = obj_size / 2 + 1
            if want_touch and _attempt < 60:
                mate = mates[int(rng.integers(len(mates)))]
                t = rng.uniform(0, 2 * math.pi)
                d = (mate.size + obj_size) / 2 * rng.uniform(0.8, 0.98)
                cx, cy = mate.cx + d * math.cos(t), mate.cy + d * math.sin(t)
                if not (margin <= cx <= size - margin and margin <= cy <= size - margin):
                    continue
            else:
                cx, cy = rng.uniform(margin, size - margin, 2)
            obj = WorldObject(str(cls), str(color), float(cx), float(cy), float(obj_size), float(rng.uniform(0, 360)))
            cov = shape_coverage(obj.cls, obj.cx, obj.cy, obj.size, obj.angle, size, size)
            if _placed_ok(cov, [m for _, m in placed], MULTI_MIN_VISIBLE):
                own = (cov >= 0.5).sum()
                if not want_touch or _attempt >= 60 or own:
                    break
        placed.append((obj, cov))
    return _composite(seed, size, background, img, placed)
