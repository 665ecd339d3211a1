"""A procedural world of flat shapes with varied Chinese captions.

It is the demo domain's training data, its evaluation prompts and the ground truth of the
prompt-adherence judge. Everything is seeded (``numpy.random.Generator``) and fast (PIL).

Public API::

    rng = np.random.default_rng(0)
    scene = sample_scene(rng)                 # Scene(objects=(SceneObject(...),), background=128)
    image = render(scene)                     # 64x64 RGB PIL.Image
    text = caption(scene, rng)                # e.g. "左边有一个小的蓝色三角形", "画一个红色的圆形"
    images, captions, scenes = sample_batch(rng, 256)        # uint8 (N, 64, 64, 3)
    split_of("红色", "星形", "左")             # "train", "validation" or "test"
    split_scenes("test")                      # every test single-object combination

Colour is continuous: most objects are in one of the eight named colours, but a quarter are in a
random RGB colour (their captions say nothing of colour), and a fifth of the backgrounds are a
random colour instead of grey (captions never describe the background). The VAE thereby learns
to reconstruct any colour, so that fine-tuning can teach a colour the world never names.

Three-way split of the 240 (colour, shape, position) combinations by
``k = (colour_index + 2 * shape_index + 3 * position_index) % 7`` with indices into
``COLOUR_NAMES``, ``SHAPES`` and ``POSITIONS``: ``k == 0`` is the test split (what ``eval``
reports, never used to choose anything), ``k == 1`` the validation split (used to choose the
training steps and the guidance), the rest train. Every colour, shape and position alone still
appears in training; training scenes never contain a validation or test combination.

Captions come in many phrasings (``CAPTION_FRAMES``); ``UNSEEN_FRAMES`` are phrasings that
training never uses, for measuring how the model copes with prompts written by someone else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
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
SPLIT_MODULUS = 7
SPLITS = ("train", "validation", "test")
EVAL_SETS = ("test", "validation", "unseen")  # the splits eval reports on, and the unseen phrasings

# Continuous colour: the share of objects in a random (unnamed) colour, of backgrounds in a random
# colour, and the least RGB distance between an object and its background (the judge segments at 40).
OFF_PALETTE_RATE = 0.25
COLOURED_BACKGROUND_RATE = 0.2
MIN_CONTRAST = 90.0

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

# Sentence frames around a noun phrase {o} (e.g. "大的红色圆形") and a place {w} (e.g. "左边"):
# descriptions (also the parts of two-object captions) and requests (whole single-object prompts).
# No frame contains a position character outside {w} (the judge reads 上/下/中/左/右 as positions).
PLAIN_FRAMES: tuple[str, ...] = ("一个{o}", "{o}")
PLACED_FRAMES: tuple[str, ...] = (
    "{w}有一个{o}", "{w}是一个{o}", "一个{o}在{w}", "一个{o}位于{w}", "{o}，在画面{w}", "画面{w}有一个{o}",
    "{w}的{o}", "{o}在画面的{w}", "{w}画着一个{o}",
)
PLAIN_REQUESTS: tuple[str, ...] = ("画一个{o}", "请生成一个{o}", "一张{o}的图片", "{o}的图片", "生成一幅{o}", "一幅画，画着一个{o}")
PLACED_REQUESTS: tuple[str, ...] = ("在{w}画一个{o}", "请在{w}生成一个{o}", "一张图片，{w}有一个{o}", "画一个{o}在{w}")
CAPTION_FRAMES: tuple[str, ...] = PLAIN_FRAMES + PLACED_FRAMES + PLAIN_REQUESTS + PLACED_REQUESTS
# Phrasings no training caption uses (``caption`` never draws them): the unseen-phrasing eval.
UNSEEN_FRAMES: tuple[str, ...] = (
    "帮我画个{o}，放在{w}", "来一个{o}，要在{w}", "我想看{w}出现一个{o}", "{w}那里摆着一个{o}",
    "能不能画个{o}在{w}", "麻烦生成：{w}一个{o}", "{o}一个，位置在{w}", "给我{w}有{o}的画",
)


@dataclass(frozen=True)
class SceneObject:
    """One shape; ``colour`` names a palette colour, or is None for an unnamed ``rgb`` colour."""

    colour: str | None
    shape: str
    size: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    radius: float | None = None
    rgb: RGB | None = None

    @property
    def fill(self) -> RGB:
        return self.rgb if self.rgb is not None else COLOURS[self.colour]

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
    def combination(self) -> tuple[str | None, str, str]:
        return self.colour, self.shape, self.position


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: int | RGB = 130

    @property
    def background_rgb(self) -> RGB:
        return (self.background,) * 3 if isinstance(self.background, int) else self.background


def split_of(colour: str | None, shape: str, position: str) -> str:
    """"train", "validation" or "test" for a (colour, shape, position) (see the module docstring).
    Objects in an unnamed colour belong to no combination a caption can ask for: always train."""
    if colour is None:
        return "train"
    key = (COLOUR_NAMES.index(colour) + 2 * SHAPES.index(shape) + 3 * POSITIONS.index(position)) % SPLIT_MODULUS
    return {0: "test", 1: "validation"}.get(key, "train")


def scene_split(scene: Scene) -> str:
    """The scene's split: "test" or "validation" if any object is (test first), else "train"."""
    splits = {split_of(*obj.combination) for obj in scene.objects}
    return next((s for s in ("test", "validation") if s in splits), "train")


def distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def random_rgb(rng: np.random.Generator, away_from: list, min_distance: float) -> RGB | None:
    """A uniform random colour at least ``min_distance`` from each of ``away_from`` (None after 20 tries)."""
    for _ in range(20):
        rgb = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if all(distance(rgb, other) >= min_distance for other in away_from):
            return rgb
    return None


def _random_object(rng: np.random.Generator, position: str, background: RGB, off_palette_rate: float, colour: str | None = None) -> SceneObject:
    size = SIZES[rng.integers(len(SIZES))]
    low, high = RADII[size]
    rgb = None
    if colour is None:
        rgb = random_rgb(rng, [background], MIN_CONTRAST) if rng.random() < off_palette_rate else None
        if rgb is None:
            colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    return SceneObject(
        colour=colour,
        shape=SHAPES[rng.integers(len(SHAPES))],
        size=size,
        position=position,
        dx=float(rng.uniform(-JITTER, JITTER)),
        dy=float(rng.uniform(-JITTER, JITTER)),
        radius=float(rng.uniform(low, high)),
        rgb=rgb,
    )


def _random_background(rng: np.random.Generator, objects: tuple[SceneObject, ...], coloured_rate: float) -> int | RGB:
    """Grey, or (sometimes) a random colour far enough from every object to keep it visible."""
    if rng.random() < coloured_rate:
        rgb = random_rgb(rng, [obj.fill for obj in objects], MIN_CONTRAST)
        if rgb is not None:
            return rgb
    grey = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    return grey if all(distance((grey,) * 3, obj.fill) >= MIN_CONTRAST / 2 for obj in objects) else 130


def _random_scene(rng: np.random.Generator, max_objects: int, off_palette_rate: float, coloured_background_rate: float) -> Scene:
    grey = (130, 130, 130)
    if max_objects >= 2 and rng.random() < 0.35:
        pair = PAIRED_POSITIONS[rng.integers(len(PAIRED_POSITIONS))]
        first = _random_object(rng, pair[0], grey, off_palette_rate)
        others = [c for c in COLOUR_NAMES if c != first.colour]
        second = _random_object(rng, pair[1], grey, off_palette_rate, colour=others[rng.integers(len(others))])
        objects = (first, second)
    else:
        objects = (_random_object(rng, POSITIONS[rng.integers(len(POSITIONS))], grey, off_palette_rate),)
    return Scene(objects, _random_background(rng, objects, coloured_background_rate))


def sample_scene(
    rng: np.random.Generator,
    split: str = "train",
    max_objects: int = 2,
    off_palette_rate: float = OFF_PALETTE_RATE,
    coloured_background_rate: float = COLOURED_BACKGROUND_RATE,
) -> Scene:
    """A random scene of ``split`` ("train", "validation", "test"), or of any split ("all").
    ``off_palette_rate``: the share of (first) objects in a random colour; ``coloured_background_rate``:
    of backgrounds in a random colour."""
    if split not in SPLITS + ("all",):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    while True:
        scene = _random_scene(rng, max_objects, off_palette_rate, coloured_background_rate)
        if split == "all" or scene_split(scene) == split:
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
    image = Image.new("RGB", (big, big), scene.background_rgb)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj, obj.fill, big / IMAGE_SIZE)
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


def noun_phrase(obj: SceneObject, rng: np.random.Generator, shape_word: str | None = None) -> str:
    """The object's colour (when it has a name), size (sometimes) and shape, with or without 的."""
    shape = shape_word or _shape_word(rng, obj.shape)
    size = obj.size if rng.random() < 0.5 else ""
    if obj.colour is None:
        return _pick(rng, (f"{size}的{shape}", f"{size}{shape}")) if size else shape
    colour = obj.colour
    if size:
        return _pick(rng, (f"{size}的{colour}{shape}", f"{size}{colour}{shape}", f"{colour}的{size}{shape}"))
    return _pick(rng, (f"{colour}{shape}", f"{colour}的{shape}"))


def describe_object(obj: SceneObject, rng: np.random.Generator, with_position: bool = True, shape_word: str | None = None, requests: bool = True) -> str:
    """One object in one of ``CAPTION_FRAMES`` (position included or not; ``requests``: may be a
    request such as "画一个…", else a description only).

    ``shape_word`` names a shape outside the world (the fine-tuning benchmark's new shape)."""
    thing = noun_phrase(obj, rng, shape_word)
    request = requests and rng.random() < 0.4
    if with_position and rng.random() < 0.8:
        return _pick(rng, PLACED_REQUESTS if request else PLACED_FRAMES).format(o=thing, w=_position_word(rng, obj.position))
    return _pick(rng, PLAIN_REQUESTS if request else PLAIN_FRAMES).format(o=thing)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random natural Chinese caption of the scene (many phrasings, some omit size or position)."""
    if len(scene.objects) == 1:
        return describe_object(scene.objects[0], rng)
    first, second = scene.objects
    if rng.random() < 0.2:
        joiner = _pick(rng, ("和", "与", "，"))
        return noun_phrase(first, rng) + joiner + noun_phrase(second, rng)
    a = describe_object(first, rng, requests=False)
    b = describe_object(second, rng, requests=False)
    if not any(word in a for word in POSITION_WORDS[first.position]):
        a = f"{_position_word(rng, first.position)}是{a}"
    if not any(word in b for word in POSITION_WORDS[second.position]):
        b = f"{_position_word(rng, second.position)}是{b}"
    return f"{a}，{b}"


def canonical_caption(scene: Scene) -> str:
    """The fixed, fully specified caption used for evaluation prompts."""
    parts = [f"{POSITION_WORDS[o.position][0]}有一个{o.size}的{o.colour or ''}{o.shape}" for o in scene.objects]
    return "，".join(parts)


def sample_batch(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE, split: str = "train", max_objects: int = 2):
    """``n`` random pairs: (uint8 array (n, size, size, 3), captions, scenes)."""
    scenes = [sample_scene(rng, split=split, max_objects=max_objects) for _ in range(n)]
    images = np.stack([np.asarray(render(scene, size)) for scene in scenes])
    return images, [caption(scene, rng) for scene in scenes], scenes


def split_scenes(split: str, size: str = "大") -> list[Scene]:
    """Every single-object combination of ``split``, centred on the mid-grey background, in a fixed order."""
    return [
        Scene((SceneObject(c, s, size, p),), background=130)
        for c in COLOUR_NAMES
        for s in SHAPES
        for p in POSITIONS
        if split_of(c, s, p) == split
    ]


def unseen_phrasing(obj: SceneObject, frame: str) -> str:
    """``obj`` (a named colour) in one of ``UNSEEN_FRAMES``, with its canonical words."""
    return frame.format(o=f"{SIZE_WORDS[obj.size][0]}{obj.colour}{obj.shape}", w=POSITION_WORDS[obj.position][0])
