"""The adherence judge recovers the world's ground truth; the caption parser reads captions back."""

from __future__ import annotations

import numpy as np
from PIL import Image

from rapid_diffusion.demo import judge, world


def _nearest(detected, obj):
    return min(detected, key=lambda d: (d.centre[0] - obj.centre[0]) ** 2 + (d.centre[1] - obj.centre[1]) ** 2)


def test_judge_is_right_on_at_least_98_percent_of_ground_truth_images():
    """On every kind of scene (grey or coloured background, palette or random object colours);
    colour is judged on palette objects only (a random colour has no name)."""
    rng = np.random.default_rng(2024)
    hits = {a: 0 for a in ("colour", "shape", "size", "position")}
    totals = dict.fromkeys(hits, 0)
    counts = 0
    for _ in range(300):
        scene = world.sample_scene(rng, split="all")
        detected = judge.judge_image(world.render(scene))
        counts += len(detected) == len(scene.objects)
        for obj in scene.objects:
            found = _nearest(detected, obj) if detected else None
            for attribute in hits:
                if getattr(obj, attribute) is not None:
                    totals[attribute] += 1
                    hits[attribute] += found is not None and getattr(found, attribute) == getattr(obj, attribute)
    assert counts / 300 >= 0.98
    assert totals["colour"] < 0.9 * totals["shape"]
    for attribute, value in hits.items():
        assert value / totals[attribute] >= 0.98, (attribute, value, totals[attribute])


def test_judge_reads_every_colour_and_shape_small_and_large():
    for colour in world.COLOUR_NAMES:
        for shape in world.SHAPES:
            for size, position in (("大", "左"), ("小", "下")):
                scene = world.Scene((world.SceneObject(colour, shape, size, position),), background=140)
                [found] = judge.judge_image(world.render(scene))
                assert (found.colour, found.shape, found.size, found.position) == (colour, shape, size, position)


def test_judge_works_on_upscaled_and_array_images():
    scene = world.Scene((world.SceneObject("紫色", "十字形", "大", "右"), world.SceneObject("黄色", "三角形", "小", "左")))
    image = world.render(scene)
    for variant in (image.resize((256, 256), Image.Resampling.LANCZOS), np.asarray(image)):
        found = judge.judge_image(variant)
        assert {(d.colour, d.shape, d.position) for d in found} == {("紫色", "十字形", "右"), ("黄色", "三角形", "左")}


def test_empty_grey_image_has_no_objects():
    assert judge.judge_image(Image.new("RGB", (64, 64), (130, 130, 130))) == []


def test_parse_caption_reads_phrasings_and_two_objects():
    E = judge.ExpectedObject
    assert judge.parse_caption("一个红色的圆形") == [E("红色", "圆形")]
    assert judge.parse_caption("左边有一个小的蓝色三角形") == [E("蓝色", "三角形", "小", "左")]
    assert judge.parse_caption("红色三角形，在画面上方") == [E("红色", "三角形", None, "上")]
    assert judge.parse_caption("正中间的白色正方形") == [E("白色", "正方形", None, "中")]
    assert judge.parse_caption("左边是紫色菱形，右边是橙色五角星") == [E("紫色", "菱形", None, "左"), E("橙色", "星形", None, "右")]
    assert judge.parse_caption("一个黑色圆圈和一个绿色十字") == [E("黑色", "圆形"), E("绿色", "十字形")]


def test_score_counts_each_attribute_and_the_object_count():
    scene = world.Scene((world.SceneObject("红色", "圆形", "大", "左"),))
    detected = judge.judge_image(world.render(scene))
    assert judge.judge(world.render(scene), "左边有一个大的红色圆形") == {"colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "count": 1.0}
    wrong = judge.score(judge.parse_caption("右边有一个小的蓝色圆形"), detected)
    assert wrong == {"colour": 0.0, "shape": 1.0, "size": 0.0, "position": 0.0, "count": 1.0}
    partial = judge.score(judge.parse_caption("红色圆形，蓝色星形"), detected)
    assert partial == {"colour": 0.5, "shape": 0.5, "count": 0.0}


def test_fit_shape_of_an_empty_coverage_map_is_a_low_confidence_guess():
    import numpy as np

    from rapid_diffusion.demo.judge import fit_shape

    shape, fit, *_ = fit_shape(np.full((64, 64), np.nan, dtype=np.float32))
    assert fit == 0.0 and isinstance(shape, str)
