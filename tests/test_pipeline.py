import numpy as np
import pytest

from rapid_diffusion.pipeline import (
    GenerationCancelled,
    GenerationRequest,
    Limits,
    RequestError,
    generate,
    inspect_prompt,
    read_png_settings,
)
from rapid_diffusion.samplers import SAMPLERS


def pixels(result, i=0):
    return np.asarray(result.images[i], dtype=np.int16)


@pytest.fixture()
def spec(registry):
    return registry.spec("tiny")


def run(registry, spec, **fields):
    fields.setdefault("prompt", "一个红色的圆形")
    fields.setdefault("seed", 7)
    return generate(GenerationRequest(**fields), spec, registry=registry)


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
    result = generate(GenerationRequest(prompt="蓝色正方形"), spec, registry=registry)
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
    ],
)
def test_validation_names_the_field_and_range(spec, fields, field):
    fields.setdefault("prompt", "一个红色的圆形")
    with pytest.raises(RequestError) as info:
        GenerationRequest(**fields).resolve(spec, Limits())
    assert info.value.field == field
    assert field in str(info.value)


def test_validation_happens_before_loading(test_domains):
    """A bad request is refused without loading a model."""
    import torch

    from rapid_diffusion.registry import ModelRegistry

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
    result = run(registry, spec, prompt=text)
    assert any(str(len(report.dropped_text)) in note for note in result.notes)


def test_png_carries_the_settings(registry, spec, tmp_path):
    result = run(registry, spec, num_images=2, seed=11)
    paths = result.save(tmp_path)
    settings = read_png_settings(paths[1])
    assert settings["seed"] == 12 and settings["num_images"] == 1
    assert settings["prompt"] == "一个红色的圆形"
    assert settings["domain"] == "tiny"


def test_progress_and_stop(registry, spec):
    steps = []
    result = generate(
        GenerationRequest(prompt="红色", seed=1), spec, registry=registry, progress=lambda i, n: steps.append((i, n))
    )
    total = steps[-1][1]
    assert total in (4, 5)  # PNDM (PLMS) evaluates the UNet once more than the step count
    assert steps == [(i, total) for i in range(1, total + 1)] and result.images
    with pytest.raises(GenerationCancelled):
        generate(GenerationRequest(prompt="红色", seed=1), spec, registry=registry, should_stop=lambda: True)


def test_super_resolution_without_weights_is_labelled_lanczos(registry, spec):
    result = run(registry, spec, super_resolution=True)
    assert result.images[0].size == (256, 256)
    assert result.settings["upscaler"] == "lanczos"
    assert "super_resolution" in result.timings
    assert any("lanczos" in note for note in result.notes)
