"""Live previews during denoising: latents -> RGB by one fixed linear map, no VAE decode.

As A1111's "approx cheap" preview, each latent pixel's channels are mapped to a colour by a 4x3
matrix plus a bias. The map is fitted once per pipeline on its own VAE (least squares over flat
colour blocks it encodes), so it suits any VAE: SD's, or the demo model's 4-channel one.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

PreviewCallback = Callable[[int, list[Image.Image]], None]
Projection = tuple[torch.Tensor, torch.Tensor]


def fit_projection(vae, scale: int, blocks: int = 1, num_images: int = 32, seed: int = 0) -> Projection:
    """A (channels x 3) weight and a bias taking scaled latents to RGB in [0, 1], fitted by least
    squares on ``num_images`` grids of ``blocks x blocks`` random flat colours that ``vae`` encodes
    (single-colour images fit hues best: flat red (220, 40, 40) maps to (151, 62, 4) on the demo VAE,
    (151, 129, 11) with 4x4 grids)."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_images, 3, blocks, blocks, generator=generator)
    side = blocks * scale * 4
    pixels = torch.nn.functional.interpolate(colours, size=(side, side), mode="nearest")
    with torch.inference_mode():
        encoded = vae.encode(pixels.to(vae.device, vae.dtype) * 2 - 1).latent_dist.mean
    latents = (encoded * vae.config.scaling_factor).double().cpu()
    targets = torch.nn.functional.interpolate(colours.double(), size=latents.shape[-2:], mode="nearest")
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], dim=1)
    solution = torch.linalg.lstsq(inputs, targets.permute(0, 2, 3, 1).reshape(-1, 3)).solution
    return solution[:-1].float(), solution[-1].float()


def project(latents: torch.Tensor, projection: Projection, scale: int) -> list[Image.Image]:
    """One RGB image per latent, ``scale`` times larger (nearest), as the decoded image would be."""
    weight, bias = projection
    rgb = (latents.detach().float().cpu().permute(0, 2, 3, 1) @ weight + bias).clamp(0, 1)
    pixels = (rgb * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)).resize((p.shape[1] * scale, p.shape[0] * scale), Image.NEAREST) for p in pixels]


def pipeline_projection(pipe) -> Projection:
    """The pipeline's projection, fitted on first use and kept with it."""
    if "preview_projection" not in pipe.__dict__:
        pipe.__dict__["preview_projection"] = fit_projection(pipe.vae, pipe.vae_scale_factor)
    return pipe.__dict__["preview_projection"]


def previewer(pipe, preview: PreviewCallback | None, every: int) -> Callable[[int, torch.Tensor], None] | None:
    """``show(step, latents)`` calling ``preview(step, images)`` on every ``every``-th step; None when
    ``preview`` is None, so that the denoising loop does no preview work at all."""
    if preview is None:
        return None
    if every < 1:
        raise ValueError(f"preview_every must be at least 1, got {every}")
    projection, scale = pipeline_projection(pipe), pipe.vae_scale_factor

    def show(step: int, latents: torch.Tensor) -> None:
        if step % every == 0:
            preview(step, project(latents, projection, scale))

    return show
