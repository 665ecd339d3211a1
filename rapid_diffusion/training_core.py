"""What every diffusion training loop here shares: tokenisation, the denoising loss, the domain YAML.

Used by the fine-tuner (``train.py``), the demo model's recipe (``demo/train_demo.py``) and the
knowledge demo (``knowledge/finetune_demo.py``), so that a fix to the loss or to the way a new
model registers itself reaches all three.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from .paths import home_dir


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """The same padding and truncation the pipeline uses at inference."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def denoising_loss(unet, noise_scheduler, latents, hidden, noise=None, timesteps=None, generator=None) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (noise, or v for v-prediction schedulers)
    at random timesteps, or at the given ``noise`` and ``timesteps`` (a comparable validation loss)."""
    latents = latents.float()
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if timesteps is None:
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device, generator=generator
        )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, hidden.to(noisy.dtype), return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float())


def write_domain_yaml(domain_id: str, data: dict) -> Path:
    """``$RAPID_DIFFUSION_HOME/domains/<id>.yaml`` (written whole, then renamed): the picker lists it."""
    folder = home_dir() / "domains"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{domain_id}.yaml"
    tmp = folder / f".{domain_id}.yaml.tmp"
    try:
        tmp.write_text(yaml.safe_dump({"id": domain_id, **data}, allow_unicode=True, sort_keys=False), encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
