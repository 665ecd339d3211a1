"""Sampler names -> diffusers schedulers, built from the model's own scheduler config.

A fresh scheduler is made for every request: schedulers keep per-run state (timesteps,
multistep history), so sharing one between requests would mix them.

Every sampler takes the model's noise schedule and sampling fields (:data:`MODEL_FIELDS`) from the
model's own scheduler, with the values that scheduler really uses, its class defaults included.
``SomeScheduler.from_config(model_config)`` alone is not enough: a field the model's config does not
name (``clip_sample`` is no field of ``PNDMScheduler``), or names only as a default of its class
(``_use_default_values``), takes the *new* class's default instead, and some of those are meant for
pixel-space models. DDIM's ``clip_sample=True`` clipped the predicted clean latents to [-1, 1] and made
the demo model draw noise (v-prediction; its latents reach ~7, a fifth of their values lie outside
±1); see :data:`LATENT_DEFAULTS`.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SAMPLERS = {
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}

SAMPLER_TITLES = {
    "pndm": "PNDM",
    "dpmpp_2m": "DPM-Solver++ 2M",
    "dpmpp_2m_karras": "DPM-Solver++ 2M Karras",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler Ancestral",
    "unipc": "UniPC",
}
SAMPLER_LABELS = {**SAMPLER_TITLES, "pndm": "PNDM (论文默认 / paper default)"}


# The noise schedule the UNet was trained on and how its output is read: the model's, for every sampler.
MODEL_FIELDS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
)
# Where the model's scheduler has no such field: the latent-diffusion value. Latents are not bounded
# by [-1, 1], so clipping or thresholding the predicted clean sample (diffusers' DDIM default,
# made for pixel-space DDPMs) is wrong for every Stable-Diffusion-style model.
LATENT_DEFAULTS = {"clip_sample": False, "thresholding": False}


def make_scheduler(name: str, model_config: Mapping[str, Any]):
    """A new scheduler of kind ``name`` on the model's own noise schedule.

    ``model_config`` is the config of the scheduler the model ships with (not of one made here
    for an earlier request: a field its class lacks would be lost on the way).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    fields = {**LATENT_DEFAULTS, **model_fields(model_config), **overrides}
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{key: value for key, value in fields.items() if key in accepted})


def model_fields(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`MODEL_FIELDS` the model's scheduler has, with the values it uses."""
    return {key: model_config[key] for key in MODEL_FIELDS if key in model_config}


def _check_names_match_specs() -> None:
    from ..domains import SAMPLER_NAMES

    if tuple(SAMPLERS) != SAMPLER_NAMES:
        raise RuntimeError("samplers.SAMPLERS and domains.SAMPLER_NAMES disagree")


_check_names_match_specs()
