"""Sampler names -> diffusers schedulers, built from the model's own scheduler config.

A fresh scheduler is made for every request: schedulers keep per-run state (timesteps,
multistep history), so sharing one between requests would mix them.
"""

from __future__ import annotations

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

SAMPLER_LABELS = {
    "pndm": "PNDM (论文默认 / paper default)",
    "dpmpp_2m": "DPM-Solver++ 2M",
    "dpmpp_2m_karras": "DPM-Solver++ 2M Karras",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler Ancestral",
    "unipc": "UniPC",
}


def make_scheduler(name: str, base_config):
    """A new scheduler of kind ``name`` sharing the model's noise schedule (betas, timesteps)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    return cls.from_config(base_config, **overrides)


def _check_names_match_specs() -> None:
    from .domains import SAMPLER_NAMES

    if tuple(SAMPLERS) != SAMPLER_NAMES:
        raise RuntimeError("samplers.SAMPLERS and domains.SAMPLER_NAMES disagree")


_check_names_match_specs()
