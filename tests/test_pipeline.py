import io

import numpy as np
import pytest

from rapid_diffusion.messages import say
from PIL import Image

from rapid_diffusion.generation import request
from rapid_diffusion.generation.pipeline import GenerationCancelled, read_png_settings
from helpers import generate_one
from rapid_diffusion.generation.request import MAX_SEED, GenerationRequest, Limits, RequestError, inspect_prompt
from rapid_diffusion.generation.samplers import SAMPLERS


def pixels(result, i=0):
    return np.asarray(result.images[i], dtype=np.int16)


@pytest.fixture()
def spec(registry):
    return registry.spec("tiny")


def run(registry, spec, **fields):
    fields.setdefault("prompt", "一个红色的圆形")
    fields.setdefault("seed", 7)
    return generate_one(GenerationRequest(**fields), spec, registry=registry)


def test_defaults_come_from_the_domain(registry, spec):
    result = run(registry, spec)
    assert result.settings["num_inference_steps"] == spec.num_inference_steps == 4
    assert result.settings["negative_prompt"] == "模糊"
    assert result.settings["sampler"] == "pndm"
    assert result.images[0].size == (64, 64)
    assert set(result.timings) == {"text_encoder", "unet", "vae_decode", "total"}
    assert all(t >= 0 for t in result.timings.values())


def test_same_request_same_pixels_other_seed_other_pixels(registry, spec):
    first, again, other = run(registry, spec), run(registry, spec), run(registry, spec, seed=8)
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1.0


def test_image_i_uses_seed_plus_i_and_reproduces_alone(registry, spec):
    batch = run(registry, spec, num_images=3, seed=100)
    assert batch.seeds == [100, 101, 102]
    alone = run(registry, spec, seed=102)
    assert np.abs(pixels(batch, 2) - pixels(alone)).max() <= 1
    assert np.abs(pixels(batch, 0) - pixels(batch, 1)).mean() > 1.0


def test_random_seed_is_reported_and_reproducible(registry, spec):
    result = generate_one(GenerationRequest(prompt="蓝色正方形"), spec, registry=registry)
    replay = run(registry, spec, prompt="蓝色正方形", seed=result.seeds[0])
    assert np.array_equal(pixels(result), pixels(replay))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_and_is_recorded(registry, spec, sampler):
    result = run(registry, spec, sampler=sampler)
    assert result.settings["sampler"] == sampler
    assert type(registry.get(spec).pipe.scheduler).__name__ == SAMPLERS[sampler][0].__name__


def test_samplers_give_different_images(registry, spec):
    a, b = run(registry, spec, sampler="pndm"), run(registry, spec, sampler="euler_a")
    assert np.abs(pixels(a) - pixels(b)).mean() > 0.5


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "长" * 1001}, "prompt"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 1000}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"seed": -5}, "seed"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 99}, "num_images"),
        ({"height": 60}, "height"),
        ({"width": 4096}, "width"),
        ({"sampler": "dpm_magic"}, "sampler"),
        ({"num_inference_steps": "20"}, "num_inference_steps"),
        ({"super_resolution": "yes"}, "super_resolution"),
        ({"seed": MAX_SEED, "num_images": 2}, "seed"),
        ({"seed": MAX_SEED - 6, "num_images": 8}, "seed"),
        ({"prompt": "红色\ud800圆形"}, "prompt"),
        ({"negative_prompt": "\udc00"}, "negative_prompt"),
    ],
)
def test_validation_names_the_field_and_range(spec, fields, field):
    fields.setdefault("prompt", "一个红色的圆形")
    with pytest.raises(RequestError) as info:
        GenerationRequest(**fields).resolve(spec, Limits())
    assert info.value.field == field
    assert field in str(info.value)


def test_the_last_image_of_a_request_keeps_a_valid_seed(spec, monkeypatch):
    GenerationRequest(prompt="红色", seed=MAX_SEED - 7, num_images=8).resolve(spec, Limits())
    with pytest.raises(RequestError, match=f"between 0 and {MAX_SEED - 7} for 8 images"):
        GenerationRequest(prompt="红色", seed=MAX_SEED, num_images=8).resolve(spec, Limits())
    monkeypatch.setattr(request.random, "randint", lambda low, high: high)  # the largest seed it may pick
    picked = GenerationRequest(prompt="红色", num_images=1).resolve(spec, Limits(max_images=8))
    assert picked.seed + 8 - 1 == MAX_SEED


def test_validation_happens_before_loading(test_domains):
    """A bad request is refused without loading a model."""
    import torch

    from rapid_diffusion.models.registry import ModelRegistry

    registry = ModelRegistry(device=torch.device("cpu"), loader=lambda *a: pytest.fail("must not load"))
    spec = registry.spec("tiny")
    with pytest.raises(RequestError):
        GenerationRequest(prompt="").resolve(spec)


def test_long_prompt_reports_dropped_characters(registry, spec):
    tokenizer = registry.get(spec).pipe.tokenizer
    short = inspect_prompt(tokenizer, "一个红色的圆形")
    assert not short.truncated and short.num_tokens == 9
    text = "红色圆形" * 10 + "最后的字"
    report = inspect_prompt(tokenizer, text)
    assert report.truncated
    assert report.max_tokens == 32
    assert len(text) - len(report.dropped_text) == 30  # 32 tokens minus [CLS] and [SEP]
    assert report.dropped_text.endswith("最后的字")
    assert report.notes() == [say("prompt_truncated", window=32, count=len(report.dropped_text), dropped=report.dropped_text)]
    result = run(registry, spec, prompt=text)
    assert any(str(len(report.dropped_text)) in note for note in result.notes)


def test_png_carries_the_settings(registry, spec, tmp_path):
    result = run(registry, spec, num_images=2, seed=11)
    paths = result.save(tmp_path)
    settings = read_png_settings(paths[1])
    assert settings["seed"] == 12 and settings["num_images"] == 1
    assert settings["prompt"] == "一个红色的圆形"
    assert settings["domain"] == "tiny"


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_progress_counts_the_requested_steps_once_each(registry, spec, sampler):
    """PNDM evaluates the UNet 5 times for 4 steps (PLMS warm-up); progress still says 1/4 .. 4/4."""
    steps, evaluations = [], []
    hook = registry.get(spec).pipe.unet.register_forward_hook(lambda *args: evaluations.append(1))
    try:
        result = generate_one(
            GenerationRequest(prompt="红色", seed=1, sampler=sampler),
            spec,
            registry=registry,
            progress=lambda i, n: steps.append((i, n)),
        )
    finally:
        hook.remove()
    assert steps == [(i, 4) for i in range(1, 5)] and result.images
    assert len(evaluations) == (5 if sampler == "pndm" else 4)


def test_stop_cancels(registry, spec):
    with pytest.raises(GenerationCancelled):
        generate_one(GenerationRequest(prompt="红色", seed=1), spec, registry=registry, should_stop=lambda: True)


def test_a_sampler_does_not_depend_on_the_one_before(registry, spec):
    """Each request's scheduler comes from the model's own config, not from the last request's
    scheduler (Euler has no set_alpha_to_one, DDIM's default of it is True)."""
    ddim = run(registry, spec, sampler="ddim")
    direct = dict(registry.get(spec).pipe.scheduler.config)
    run(registry, spec, sampler="euler")
    after_euler = run(registry, spec, sampler="ddim")
    assert dict(registry.get(spec).pipe.scheduler.config) == direct
    assert direct["set_alpha_to_one"] is False and direct["clip_sample"] is False
    assert np.array_equal(pixels(ddim), pixels(after_euler))


def test_super_resolution_without_weights_is_labelled_lanczos(registry, spec):
    result = run(registry, spec, super_resolution=True)
    assert result.images[0].size == (256, 256)
    assert result.settings["upscaler"] == "lanczos"
    assert "super_resolution" in result.timings
    assert any("lanczos" in note for note in result.notes)


def test_png_metadata_states_the_output_size_after_super_resolution(registry, spec):
    plain, upscaled = run(registry, spec), run(registry, spec, super_resolution=True)
    with Image.open(io.BytesIO(plain.png_bytes(0))) as image:
        assert image.size == (64, 64) and "Size: 64x64, Model:" in image.text["parameters"]
    with Image.open(io.BytesIO(upscaled.png_bytes(0))) as image:
        assert image.size == (256, 256)
        assert "Size: 256x256, generated at 64x64, super-resolution x4, Model:" in image.text["parameters"]
    settings = read_png_settings(upscaled.png_bytes(0))
    assert (settings["width"], settings["output_width"], settings["output_height"]) == (64, 256, 256)


def test_file_names_differ_between_runs_and_repeat_for_the_same_settings(registry, spec, tmp_path):
    runs = [run(registry, spec, seed=44), run(registry, spec, seed=44, super_resolution=True), run(registry, spec, seed=44, sampler="ddim")]
    stems = [result.file_stem(0) for result in runs]
    assert stems[0].startswith("tiny-44-pndm-4steps-") and len(stems[0].rsplit("-", 1)[1]) == 8
    assert stems[1].startswith("tiny-44-pndm-4steps-sr4-")
    assert stems[2].startswith("tiny-44-ddim-4steps-")
    assert len(set(stems)) == 3
    assert run(registry, spec, seed=44).file_stem(0) == stems[0]
    assert run(registry, spec, seed=44, guidance_scale=7.5).file_stem(0) != stems[0]
    out = tmp_path / "out"
    paths = runs[0].save(out) + runs[1].save(out) + runs[2].save(out)
    assert [path.name for path in paths] == [f"{stem}.png" for stem in stems]
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in paths)


def test_summary_is_one_readable_line_per_image(registry, spec):
    result = run(registry, spec, seed=44, num_images=2, guidance_scale=7.5)
    assert result.summary(1) == "种子 seed 45 · 64×64 · PNDM · 4 步 steps · 引导 guidance 7.5"
    upscaled = run(registry, spec, seed=44, sampler="dpmpp_2m_karras", super_resolution=True)
    assert upscaled.summary(0) == (
        "种子 seed 44 · 256×256 (64×64 → 超分辨率 super-resolution ×4) · DPM-Solver++ 2M Karras · 4 步 steps · 引导 guidance 5"
    )


@pytest.mark.parametrize("prompt, english", [("a red circle on the left", True), ("左边有一个 red 圆形", False),
                                             ("画一个 star", True), ("一只猫 cat", False), ("3D 圆形", False)])
def test_an_english_prompt_gets_a_hint_that_the_model_reads_chinese(registry, spec, prompt, english):
    report = inspect_prompt(registry.tokenizer(spec), prompt)
    assert report.mostly_latin is english
    assert (say("prompt_not_chinese") in report.notes()) is english
