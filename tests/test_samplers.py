"""Every sampler runs on the model's own noise schedule, and follows the prompt on the demo model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import PNDMScheduler

from rapid_diffusion.generation.samplers import SAMPLERS, make_scheduler
from rapid_diffusion.paths import SHIPPED_DOMAINS_DIR

from helpers import DEMO_ADHERENCE_FLOOR, DEMO_MODEL

needs_model = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="assets/demo-model not trained yet")
# The scheduler_config.json of SD1.x and the PAI-Diffusion hub models, as written by diffusers 0.x:
# no prediction_type or timestep_spacing (the defaults of its class), clip_sample named.
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def reference_alphas_cumprod(beta_start: float, beta_end: float, schedule: str) -> torch.Tensor:
    """DDPM's linear betas, or SD's "scaled_linear" (linear in sqrt(beta)), over 1000 steps."""
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, 1000, dtype=torch.float64)
    else:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@pytest.fixture(scope="module")
def demo_config():
    return PNDMScheduler.from_pretrained(DEMO_MODEL, subfolder="scheduler").config


@pytest.fixture(scope="module")
def sd1_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1-scheduler")
    (folder / "scheduler_config.json").write_text(json.dumps(SD1_SCHEDULER), encoding="utf-8")
    return PNDMScheduler.from_pretrained(folder).config


@needs_model
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize(
    "config_name, prediction, betas",
    [("demo_config", "v_prediction", (0.0001, 0.02, "linear")), ("sd1_config", "epsilon", (0.00085, 0.012, "scaled_linear"))],
)
def test_every_sampler_keeps_the_models_schedule(request, sampler, config_name, prediction, betas):
    scheduler = make_scheduler(sampler, request.getfixturevalue(config_name))
    config = scheduler.config
    assert type(scheduler) is SAMPLERS[sampler][0]
    assert config.prediction_type == prediction
    assert (config.timestep_spacing, config.steps_offset) == ("leading", 1)  # PNDM's, as the model uses it
    assert torch.allclose(scheduler.alphas_cumprod.double(), reference_alphas_cumprod(*betas), atol=1e-6)
    assert not config.get("clip_sample", False) and not config.get("thresholding", False)
    assert config.get("set_alpha_to_one", False) is False


@needs_model
def test_ddim_step_matches_the_v_prediction_formula_on_large_latents(demo_config):
    """One deterministic DDIM step (eta 0) against the closed form, on latents beyond [-1, 1] as
    the demo VAE makes them: x0 = a x - s v, eps = a v + s x, x_prev = a' x0 + s' eps."""
    scheduler = make_scheduler("ddim", demo_config)
    scheduler.set_timesteps(20)
    t = int(scheduler.timesteps[1])
    generator = torch.Generator().manual_seed(0)
    sample = 3.0 * torch.randn(1, 4, 16, 16, generator=generator)
    v = torch.randn(1, 4, 16, 16, generator=generator)
    alphas = reference_alphas_cumprod(0.0001, 0.02, "linear")
    a, s = alphas[t].sqrt(), (1 - alphas[t]).sqrt()
    a_prev, s_prev = alphas[t - 50].sqrt(), (1 - alphas[t - 50]).sqrt()
    x0, eps = a * sample - s * v, a * v + s * sample
    expected = a_prev * x0 + s_prev * eps
    stepped = scheduler.step(v, t, sample, eta=0.0).prev_sample
    assert x0.abs().max() > 2.0
    assert torch.allclose(stepped, expected.float(), atol=1e-4)


@pytest.fixture(scope="module")
def demo():
    from rapid_diffusion.domains import load_domains
    from rapid_diffusion.models.registry import ModelRegistry

    spec = load_domains([SHIPPED_DOMAINS_DIR])["demo"]
    registry = ModelRegistry(domains={"demo": spec})
    registry.get(spec)
    return spec, registry


@needs_model
@pytest.mark.slow
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_follows_the_prompt_on_the_demo_model(demo, sampler):
    from rapid_diffusion.demo.evaluate import evaluate

    spec, registry = demo
    report = evaluate(dataclasses.replace(spec, sampler=sampler), registry, num_prompts=8, steps=20, seed=0, images_per_prompt=2)
    assert report["num_images"] == 16
    for metric, floor in DEMO_ADHERENCE_FLOOR.items():
        assert report["accuracy"][metric] >= floor, (sampler, metric, report["accuracy"])
