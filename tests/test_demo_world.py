"""The procedural demo world: seeded, exact colours, varied captions, a clean held-out split."""

from __future__ import annotations

import time

import numpy as np

from rapid_diffusion.demo import world
from rapid_diffusion.demo.judge import parse_caption


def test_same_seed_same_pairs_and_different_seed_differs():
    a_images, a_captions, a_scenes = world.sample_batch(np.random.default_rng(7), 16)
    b_images, b_captions, b_scenes = world.sample_batch(np.random.default_rng(7), 16)
    c_images, c_captions, _ = world.sample_batch(np.random.default_rng(8), 16)
    assert np.array_equal(a_images, b_images) and a_captions == b_captions and a_scenes == b_scenes
    assert not np.array_equal(a_images, c_images) and a_captions != c_captions
    assert a_images.shape == (16, 64, 64, 3) and a_images.dtype == np.uint8


def test_colours_are_exact_and_background_is_neutral_grey():
    assert world.COLOURS["红色"] == (220, 40, 40) and world.COLOURS["蓝色"] == (40, 90, 220)
    assert len(world.COLOURS) == 8 and len(world.SHAPES) >= 5
    for colour, rgb in world.COLOURS.items():
        scene = world.Scene((world.SceneObject(colour, "正方形", "大", "中"),), background=123)
        pixels = np.asarray(world.render(scene))
        assert tuple(pixels[32, 32]) == rgb
        assert tuple(pixels[1, 1]) == (123, 123, 123)
    rng = np.random.default_rng(0)
    backgrounds = {world.sample_scene(rng).background for _ in range(300)}
    assert min(backgrounds) >= 100 and max(backgrounds) <= 160 and len(backgrounds) > 20


def test_positions_and_sizes_are_drawn_where_named():
    left = np.asarray(world.render(world.Scene((world.SceneObject("红色", "圆形", "小", "左"),))))
    top = np.asarray(world.render(world.Scene((world.SceneObject("红色", "圆形", "大", "上"),))))
    assert tuple(left[32, 16]) == (220, 40, 40) and tuple(left[32, 48]) != (220, 40, 40)
    assert tuple(top[16, 32]) == (220, 40, 40) and tuple(top[48, 32]) != (220, 40, 40)
    assert (top == (220, 40, 40)).all(axis=2).sum() > 3 * (left == (220, 40, 40)).all(axis=2).sum()
    assert world.render(world.Scene((world.SceneObject("红色", "星形", "大", "中"),)), size=128).size == (128, 128)


def test_caption_vocabulary_covers_every_attribute_with_varied_phrasings():
    rng = np.random.default_rng(1)
    captions = [world.caption(world.sample_scene(rng, split="all"), rng) for _ in range(600)]
    text = "".join(captions)
    for word in [*world.COLOUR_NAMES, *world.SHAPES, "左边", "右边", "中间", "上", "下", "大", "小", "，"]:
        assert word in text, word
    scene = world.Scene((world.SceneObject("红色", "圆形", "小", "左"),))
    phrasings = {world.caption(scene, rng) for _ in range(200)}
    assert len(phrasings) >= 10
    assert "一个红色的圆形" in phrasings and "红色圆形" in phrasings


def test_captions_describe_their_scene():
    rng = np.random.default_rng(2)
    for _ in range(300):
        scene = world.sample_scene(rng, split="all")
        text = world.caption(scene, rng)
        parsed = parse_caption(text)
        assert len(parsed) == len(scene.objects), text
        for want, obj in zip(parsed, scene.objects):
            for attribute in ("colour", "shape", "size", "position"):
                value = getattr(want, attribute)
                assert value is None or value == getattr(obj, attribute), (text, attribute)
            assert want.colour == obj.colour and want.shape == obj.shape, text


def test_held_out_split_is_deterministic_and_never_in_training():
    assert world.is_held_out("红色", "圆形", "左")
    assert len(world.HELD_OUT) == sum(
        (world.COLOUR_NAMES.index(c) + 2 * world.SHAPES.index(s) + 3 * world.POSITIONS.index(p)) % 7 == 0
        for c in world.COLOUR_NAMES for s in world.SHAPES for p in world.POSITIONS
    )
    assert 20 <= len(world.HELD_OUT) <= 48
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(2000):
        scene = world.sample_scene(rng, split="train")
        for obj in scene.objects:
            assert not world.is_held_out(*obj.combination)
            seen.add(obj.combination)
    assert {c for c, _, _ in seen} == set(world.COLOUR_NAMES)
    assert {s for _, s, _ in seen} == set(world.SHAPES)
    assert {p for _, _, p in seen} == set(world.POSITIONS)
    held = world.sample_scene(rng, split="held_out")
    assert world.scene_is_held_out(held)
    assert {s.objects[0].combination for s in world.held_out_scenes()} == set(world.HELD_OUT)


def test_world_is_fast():
    rng = np.random.default_rng(4)
    start = time.perf_counter()
    world.sample_batch(rng, 500)
    assert 500 / (time.perf_counter() - start) > 300
