"""The prompt-adherence judge of the demo world: image -> objects, caption -> expected objects.

``judge_image`` segments the objects from the grey background, names each one's colour (nearest
world colour), shape (best-fitting template of the world's own renderer, by soft IoU), size and
position (nearest anchor), and counts them. ``parse_caption`` reads the world's vocabulary back
out of a caption. ``score`` compares the two. Numpy and Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import world

FOREGROUND_DISTANCE = 40.0
MIN_AREA = 12
SIZE_THRESHOLD = 9.5
PALETTE = np.array([world.COLOURS[c] for c in world.COLOUR_NAMES], dtype=np.float32)
ATTRIBUTES = ("colour", "shape", "size", "position")
CLAUSE_SEPARATORS = ("，", ",", "、", "；", "和", "与", "。")


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    position: str
    area: int
    centre: tuple[float, float]
    radius: float
    fit: float


@dataclass(frozen=True)
class ExpectedObject:
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None

    def merged(self, other: "ExpectedObject") -> "ExpectedObject":
        return ExpectedObject(*(getattr(self, a) or getattr(other, a) for a in ATTRIBUTES))


def _as_array(image) -> np.ndarray:
    """float32 (64, 64, 3); larger images (e.g. after x4 super-resolution) are box-downscaled."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (world.IMAGE_SIZE, world.IMAGE_SIZE):
        image = image.resize((world.IMAGE_SIZE, world.IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def estimate_background(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components by min-label propagation (numpy only); labels 1..n, 0 = background."""
    big = mask.size + 1
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        neighbours = np.where(mask, neighbours, big)
        if np.array_equal(neighbours, labels):
            break
        labels = neighbours
    unique = np.unique(labels[mask])
    relabelled = np.zeros(mask.shape, dtype=np.int32)
    for index, value in enumerate(unique, start=1):
        relabelled[labels == value] = index
    return relabelled, len(unique)


def nearest_colour(rgb: np.ndarray) -> str:
    return world.COLOUR_NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def nearest_position(cx: float, cy: float) -> str:
    return min(world.CENTRES, key=lambda p: (world.CENTRES[p][0] - cx) ** 2 + (world.CENTRES[p][1] - cy) ** 2)


def _unit_bbox(shape: str) -> tuple[float, float, float, float]:
    points = np.array(world.shape_polygon(shape, 0.0, 0.0, 1.0))
    return points[:, 0].min(), points[:, 0].max(), points[:, 1].min(), points[:, 1].max()


UNIT_BBOXES = {shape: _unit_bbox(shape) for shape in world.SHAPES}


def fit_shape(alpha: np.ndarray) -> tuple[str, float, float, float, float]:
    """Best world shape for a coverage map: (shape, soft IoU, cx, cy, radius)."""
    ys, xs = np.nonzero(np.nan_to_num(alpha) >= 0.5)
    if xs.size == 0:
        return ("圆形", 0.0, 0.0, 0.0, 0.0)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1.0, ys.min(), ys.max() + 1.0
    best = ("圆形", -1.0, 0.0, 0.0, 0.0)
    for shape, (ux0, ux1, uy0, uy1) in UNIT_BBOXES.items():
        base = ((x1 - x0) / (ux1 - ux0) + (y1 - y0) / (uy1 - uy0)) / 2
        for scale in (0.92, 1.0, 1.08):
            r = base * scale
            cx = (x0 + x1) / 2 - r * (ux0 + ux1) / 2
            cy = (y0 + y1) / 2 - r * (uy0 + uy1) / 2
            template = world.render_mask(world.SceneObject("白色", shape, "大", "中", cx - 32, cy - 32, r))
            iou = np.minimum(alpha, template).sum() / max(np.maximum(alpha, template).sum(), 1e-6)
            if iou > best[1]:
                best = (shape, float(iou), float(cx), float(cy), float(r))
    return best


def describe_component(pixels: np.ndarray, background: np.ndarray, distance: np.ndarray, component: np.ndarray) -> DetectedObject:
    strong = component & (distance >= np.median(distance[component]))
    rgb = np.median(pixels[strong], axis=0)
    colour = nearest_colour(rgb)
    direction = PALETTE[world.COLOUR_NAMES.index(colour)] - background
    alpha = ((pixels - background) @ direction) / max(float(direction @ direction), 1e-6)
    alpha = np.clip(alpha, 0.0, 1.0) * component
    if alpha.max() < 0.5:
        alpha = component.astype(np.float32)
    shape, fit, cx, cy, r = fit_shape(alpha)
    return DetectedObject(
        colour=colour,
        shape=shape,
        size="大" if r > SIZE_THRESHOLD else "小",
        position=nearest_position(cx, cy),
        area=int(component.sum()),
        centre=(cx, cy),
        radius=r,
        fit=fit,
    )


def judge_image(image) -> list[DetectedObject]:
    """Every object found in the image, largest first."""
    pixels = _as_array(image)
    background = estimate_background(pixels)
    distance = np.sqrt(((pixels - background) ** 2).sum(axis=2))
    mask = distance > FOREGROUND_DISTANCE
    labels, count = label_components(mask)
    objects = []
    for index in range(1, count + 1):
        component = labels == index
        if component.sum() >= MIN_AREA:
            grown = _dilate(component) & (distance > FOREGROUND_DISTANCE / 4)
            objects.append(describe_component(pixels, background, distance, grown))
    return sorted(objects, key=lambda o: -o.area)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow by one pixel, to take in the anti-aliased rim."""
    padded = np.pad(mask, 1)
    return padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _find(text: str, words: dict[str, tuple[str, ...]]) -> str | None:
    """The attribute whose word occurs first in ``text`` (longest word wins at a tie)."""
    hits = [(text.find(w), -len(w), name) for name, options in words.items() for w in options if w in text]
    return min(hits)[2] if hits else None


def parse_clause(text: str) -> ExpectedObject:
    return ExpectedObject(
        colour=_find(text, {c: (c, c[0] + "的") for c in world.COLOUR_NAMES}),
        shape=_find(text, world.SHAPE_WORDS),
        size=_find(text, {s: (s,) for s in world.SIZES}),
        position=_find(text, world.POSITION_WORDS),
    )


def parse_caption(text: str) -> list[ExpectedObject]:
    """Expected objects of a caption, in order; attributes a caption leaves out are None."""
    for separator in CLAUSE_SEPARATORS[1:]:
        text = text.replace(separator, CLAUSE_SEPARATORS[0])
    objects: list[ExpectedObject] = []
    for clause in filter(None, (c.strip() for c in text.split(CLAUSE_SEPARATORS[0]))):
        parsed = parse_clause(clause)
        if objects and parsed.colour is None and parsed.shape is None:
            objects[-1] = objects[-1].merged(parsed)
        elif parsed != ExpectedObject():
            objects.append(parsed)
    return objects


def score(expected: list[ExpectedObject], detected: list[DetectedObject]) -> dict[str, float]:
    """Per-attribute fraction of expected attributes met, matching objects greedily; plus count."""
    remaining = list(detected)
    hits = {a: 0 for a in ATTRIBUTES}
    totals = {a: 0 for a in ATTRIBUTES}
    for want in expected:
        match = max(remaining, key=lambda o: _agreement(want, o), default=None)
        if match is not None:
            remaining.remove(match)
        for attribute in ATTRIBUTES:
            value = getattr(want, attribute)
            if value is not None:
                totals[attribute] += 1
                hits[attribute] += int(match is not None and getattr(match, attribute) == value)
    result = {a: hits[a] / totals[a] for a in ATTRIBUTES if totals[a]}
    result["count"] = float(len(detected) == len(expected))
    return result


def _agreement(want: ExpectedObject, got: DetectedObject) -> int:
    return sum(getattr(want, a) == getattr(got, a) for a in ATTRIBUTES)


def judge(image, caption: str) -> dict[str, float]:
    """Adherence of one image to one caption (see ``score``)."""
    return score(parse_caption(caption), judge_image(image))
