"""A procedural world of flat shapes on grey backgrounds with varied Chinese captions.

It is the demo domain's training data, its evaluation prompts and the ground truth of the
prompt-adherence judge. Everything is seeded (``numpy.random.Generator``) and fast (PIL).

Public API::

    rng = np.random.default_rng(0)
    scene = sample_scene(rng)                 # Scene(objects=(SceneObject(...),), background=128)
    image = render(scene)                     # 64x64 RGB PIL.Image
    text = caption(scene, rng)                # e.g. "左边有一个小的蓝色三角形"
    images, captions, scenes = sample_batch(rng, 256)        # uint8 (N, 64, 64, 3)
    is_held_out("红色", "星形", "左")          # True for combinations kept out of training
    held_out_scenes()                         # every held-out single-object combination

Held-out split: a (colour, shape, position) combination is held out when
``(colour_index + 2 * shape_index + 3 * position_index) % 7 == 0`` with indices into
``COLOUR_NAMES``, ``SHAPES`` and ``POSITIONS``. That is 1/7 of the 240 combinations; every
colour, shape and position alone still appears in training. Training scenes (``split="train"``)
never contain a held-out combination, in any object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "红色": (220, 40, 40),
    "橙色": (245, 140, 20),
    "黄色": (240, 210, 30),
    "绿色": (40, 160, 70),
    "蓝色": (40, 90, 220),
    "紫色": (140, 60, 190),
    "黑色": (25, 25, 25),
    "白色": (245, 245, 245),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("圆形", "正方形", "三角形", "星形", "菱形", "十字形")
SIZES: tuple[str, ...] = ("大", "小")
POSITIONS: tuple[str, ...] = ("左", "中", "右", "上", "下")
PAIRED_POSITIONS: tuple[tuple[str, str], ...] = (("左", "右"), ("上", "下"))
BACKGROUND_RANGE = (100, 160)
IMAGE_SIZE = 64
HELD_OUT_MODULUS = 7

# Geometry on a 64x64 canvas: object centres and radii (half the bounding-box side).
CENTRES: dict[str, tuple[float, float]] = {"左": (16, 32), "中": (32, 32), "右": (48, 32), "上": (32, 16), "下": (32, 48)}
RADII: dict[str, tuple[float, float]] = {"大": (11.0, 13.0), "小": (6.0, 8.0)}
JITTER = 2.5
SUPERSAMPLE = 4

# Words used in captions (the first is the canonical one); the judge's caption parser reads them too.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "圆形": ("圆形", "圆圈", "圆"),
    "正方形": ("正方形", "方块", "方形"),
    "三角形": ("三角形", "三角"),
    "星形": ("星形", "五角星", "星星"),
    "菱形": ("菱形",),
    "十字形": ("十字形", "十字"),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "左": ("左边", "左侧", "左"),
    "中": ("中间", "中央", "正中", "中"),
    "右": ("右边", "右侧", "右"),
    "上": ("上面", "上方", "上边", "上"),
    "下": ("下面", "下方", "下边", "下"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"大": ("大的", "大"), "小": ("小的", "小")}


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    radius: float | None = None

    @property
    def centre(self) -> tuple[float, float]:
        x, y = CENTRES[self.position]
        return x + self.dx, y + self.dy

    @property
    def extent(self) -> float:
        """Half the bounding-box side in pixels (64x64 canvas)."""
        low, high = RADII[self.size]
        return self.radius if self.radius is not None else (low + high) / 2

    @property
    def combination(self) -> tuple[str, str, str]:
        return self.colour, self.shape, self.position


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int = 130


def is_held_out(colour: str, shape: str, position: str) -> bool:
    """True when (colour, shape, position) is kept out of training (see the module docstring)."""
    key = COLOUR_NAMES.index(colour) + 2 * SHAPES.index(shape) + 3 * POSITIONS.index(position)
    return key % HELD_OUT_MODULUS == 0


def scene_is_held_out(scene: Scene) -> bool:
    return any(is_held_out(*obj.combination) for obj in scene.objects)


HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    (c, s, p) for c in COLOUR_NAMES for s in SHAPES for p in POSITIONS if is_held_out(c, s, p)
)


def _random_object(rng: np.random.Generator, position: str, colour: str | None = None) -> SceneObject:
    size = SIZES[rng.integers(len(SIZES))]
    low, high = RADII[size]
    return SceneObject(
        colour=colour or COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        size=size,
        position=position,
        dx=float(rng.uniform(-JITTER, JITTER)),
        dy=float(rng.uniform(-JITTER, JITTER)),
        radius=float(rng.uniform(low, high)),
    )


def _random_scene(rng: np.random.Generator, max_objects: int) -> Scene:
    background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    if max_objects >= 2 and rng.random() < 0.35:
        pair = PAIRED_POSITIONS[rng.integers(len(PAIRED_POSITIONS))]
        first = _random_object(rng, pair[0])
        others = [c for c in COLOUR_NAMES if c != first.colour]
        second = _random_object(rng, pair[1], colour=others[rng.integers(len(others))])
        return Scene((first, second), background)
    return Scene((_random_object(rng, POSITIONS[rng.integers(len(POSITIONS))]),), background)


def sample_scene(rng: np.random.Generator, split: str = "train", max_objects: int = 2) -> Scene:
    """A random scene. ``split``: "train" (no held-out combination), "held_out" (at least one), or "all"."""
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be train, held_out or all, got {split!r}")
    while True:
        scene = _random_scene(rng, max_objects)
        if split == "all" or scene_is_held_out(scene) == (split == "held_out"):
            return scene


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` with bounding box [cx-r, cx+r] x [cy-r, cy+r] (circles are drawn as ellipses)."""
    if shape == "正方形":
        unit = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif shape == "三角形":
        unit = [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
    elif shape == "菱形":
        unit = [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)]
    elif shape == "星形":
        unit = []
        for k in range(10):
            angle = -math.pi / 2 + k * math.pi / 5
            radius = 1.0 if k % 2 == 0 else 0.42
            unit.append((radius * math.cos(angle), radius * math.sin(angle) + 0.1))
    elif shape == "十字形":
        a, b = 0.33, 0.95
        unit = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif shape == "圆形":
        unit = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + r * x, cy + r * y) for x, y in unit]


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill, scale: float) -> None:
    cx, cy = obj.centre
    r = obj.extent
    if obj.shape == "圆形":
        draw.ellipse([(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale], fill=fill)
    else:
        draw.polygon([(x * scale, y * scale) for x, y in shape_polygon(obj.shape, cx, cy, r)], fill=fill)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene (anti-aliased by supersampling) at ``size`` x ``size`` pixels."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj, COLOURS[obj.colour], big / IMAGE_SIZE)
    return image.reduce(SUPERSAMPLE)


def render_mask(obj: SceneObject, size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage in [0, 1] of one object, float32 (size, size): the judge's shape templates."""
    big = size * SUPERSAMPLE
    image = Image.new("L", (big, big), 0)
    draw_object(ImageDraw.Draw(image), obj, 255, big / IMAGE_SIZE)
    return np.asarray(image.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _position_word(rng: np.random.Generator, position: str) -> str:
    return _pick(rng, POSITION_WORDS[position][:-1] if position != "中" else ("中间", "中央", "正中间"))


def _shape_word(rng: np.random.Generator, shape: str) -> str:
    words = SHAPE_WORDS[shape]
    return words[0] if rng.random() < 0.7 else _pick(rng, words)


def describe_object(obj: SceneObject, rng: np.random.Generator, with_position: bool = True, shape_word: str | None = None) -> str:
    """One object in one of several natural phrasings (position and size included or not).

    ``shape_word`` names a shape outside the world (the fine-tuning benchmark's new shape)."""
    colour, shape, size = obj.colour, shape_word or _shape_word(rng, obj.shape), obj.size
    where = _position_word(rng, obj.position)
    plain = [f"一个{colour}的{shape}", f"{colour}{shape}", f"{colour}的{shape}", f"一个{size}的{colour}{shape}", f"{size}{colour}{shape}"]
    placed = [
        f"{where}有一个{colour}{shape}",
        f"{where}有一个{size}的{colour}{shape}",
        f"{where}是一个{colour}的{shape}",
        f"一个{colour}的{shape}在{where}",
        f"一个{size}{colour}{shape}位于{where}",
        f"{colour}{shape}，在画面{where}",
        f"画面{where}有一个{size}的{colour}{shape}",
        f"{where}的{colour}{shape}",
    ]
    if with_position and rng.random() < 0.8:
        return _pick(rng, placed)
    return _pick(rng, plain)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random natural Chinese caption of the scene (several phrasings, some omit size or position)."""
    if len(scene.objects) == 1:
        return describe_object(scene.objects[0], rng)
    first, second = scene.objects
    if rng.random() < 0.2:
        joiner = _pick(rng, ("和", "与", "，"))
        return describe_object(first, rng, with_position=False) + joiner + describe_object(second, rng, with_position=False)
    a = describe_object(first, rng)
    b = describe_object(second, rng)
    if not any(word in a for word in POSITION_WORDS[first.position]):
        a = f"{_position_word(rng, first.position)}是{a}"
    if not any(word in b for word in POSITION_WORDS[second.position]):
        b = f"{_position_word(rng, second.position)}是{b}"
    return f"{a}，{b}"


def canonical_caption(scene: Scene) -> str:
    """The fixed, fully specified caption used for evaluation prompts."""
    parts = [f"{POSITION_WORDS[o.position][0]}有一个{o.size}的{o.colour}{o.shape}" for o in scene.objects]
    return "，".join(parts)


def sample_batch(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE, split: str = "train", max_objects: int = 2):
    """``n`` random pairs: (uint8 array (n, size, size, 3), captions, scenes)."""
    scenes = [sample_scene(rng, split=split, max_objects=max_objects) for _ in range(n)]
    images = np.stack([np.asarray(render(scene, size)) for scene in scenes])
    return images, [caption(scene, rng) for scene in scenes], scenes

def held_out_scenes(size: str = "大") -> list[Scene]:
    """Every held-out (colour, shape, position) as a centred single-object scene, in a fixed order."""
    return [
        Scene((SceneObject(c, s, size, p),), background=130)
        for c in COLOUR_NAMES
        for s in SHAPES
        for p in POSITIONS
        if is_held_out(c, s, p)
    ]
