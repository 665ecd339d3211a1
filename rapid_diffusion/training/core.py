"""What every diffusion training loop here shares: the denoising loss, EMA, the learning-rate schedule.

Used by the fine-tuner (``trainer.py``, the runtime's one loop, which also takes the pair-batch loss
:func:`diffusion_loss` and :func:`prior_preservation_loss` from here; the knowledge demo
``rapid_diffusion_dev/knowledge_demo/finetune_demo.py`` trains through it) and by the demo model's
from-scratch recipe (``rapid_diffusion_dev/recipes/train_demo.py``: a VAE stage, an object-weighted
loss, EMA-chosen weights), so that a fix to the loss or to the way a schedule is trained reaches both. (Tokenisation is the pipeline's, ``generation.pipeline.tokenize``;
loading is the registry's, ``models.registry.load_pipeline``; the domain YAML is the domain
schema's, ``domains.write_domain_yaml``.)
"""

from __future__ import annotations

import copy

import torch


def denoising_loss(
    unet, noise_scheduler, latents, hidden, noise=None, timesteps=None, generator=None, weight=None, snr_gamma: float | None = None,
    unet_max_timestep: int | None = None,
) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (noise, or v for v-prediction schedulers)
    at random timesteps, or at the given ``noise`` and ``timesteps`` (a comparable validation loss).

    ``weight`` (broadcastable to the latents, e.g. (B, 1, h, w)) makes it a weighted mean.
    ``snr_gamma`` instead weighs each sample by its timestep (:func:`min_snr_weights`).
    ``unet_max_timestep``: the samples at or above it train the text only (:func:`predict`)."""
    if weight is not None and snr_gamma is not None:
        raise ValueError("weight and snr_gamma are alternatives")
    latents = latents.float()
    if noise is None:  # drawn on the CPU (seeded runs repeat on any device), then moved
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = predict(unet, noisy, timesteps, hidden.to(noisy.dtype), unet_max_timestep)
    errors = (prediction.float() - target.float()) ** 2
    if snr_gamma is not None:
        return (min_snr_weights(noise_scheduler, timesteps, snr_gamma) * errors.mean(dim=(1, 2, 3))).mean()
    if weight is None:
        return errors.mean()
    weight = weight.to(latents.device, torch.float32).expand_as(latents)
    return (weight * errors).sum() / weight.sum()


def predict(unet, noisy, timesteps, hidden, unet_max_timestep: int | None = None) -> torch.Tensor:
    """The UNet's prediction; samples at timesteps >= ``unet_max_timestep`` go through the UNet
    with its weights detached, so that they teach the text encoder (through the prompt) but not
    the UNet. Why: a fine-tune on a few dozen pictures memorises, at the noisiest timesteps, where
    each picture's ground colour is decided, the grounds of its few coloured pictures, and guidance
    amplifies them (benchmarks/README.md); a new word still has to work there too. One process
    only: the trainer does not apply the limit under DistributedDataParallel."""
    if unet_max_timestep is None:
        return unet(noisy, timesteps, hidden, return_dict=False)[0]
    noisiest = timesteps >= unet_max_timestep
    order = torch.argsort(noisiest.to(torch.int8), stable=True)
    trained = int((~noisiest).sum())
    parts = []
    if trained:
        first = order[:trained]
        parts.append(unet(noisy[first], timesteps[first], hidden[first], return_dict=False)[0])
    if trained < len(order):
        rest = order[trained:]
        detached = {name: parameter.detach() for name, parameter in unet.named_parameters()}
        parts.append(torch.func.functional_call(unet, detached, (noisy[rest], timesteps[rest], hidden[rest]), {"return_dict": False})[0])
    return torch.cat(parts)[torch.argsort(order)]


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023; diffusers' ``--snr_gamma``): min(SNR, gamma)
    divided by SNR + 1 for v-prediction, by SNR for epsilon. With v-prediction the noisiest
    timesteps, where a sample's global colour (its background) is decided, get almost no weight:
    a fine-tune on a few dozen pictures then hardly memorises their backgrounds (benchmarks/README.md)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr


def make_ema(module: torch.nn.Module, decay: float):
    """diffusers' EMAModel with the usual warm-up: the decay grows as (1 + step) / (10 + step) up to ``decay``."""
    from diffusers.training_utils import EMAModel

    return EMAModel(module.parameters(), decay=decay)


def averaged_copy(module: torch.nn.Module, ema) -> torch.nn.Module:
    """A frozen copy of ``module`` holding the EMA weights (the module itself keeps training)."""
    average = copy.deepcopy(module).requires_grad_(False)
    ema.copy_to(average.parameters())
    return average


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up, then a half cosine to zero at ``total_steps`` (diffusers' get_scheduler)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def diffusion_loss(batch, unet, text_encoder, vae, noise_scheduler, weight_dtype, noise=None, timesteps=None, snr_gamma=None, unet_max_timestep=None) -> torch.Tensor:
    """The denoising objective on a batch of pairs (random timesteps, or the given ones).

    Latents are the VAE posterior *mean*: for SD's VAE the posterior variance is tiny (the same as
    sampling), while small VAEs trained with a weak KL term (the demo model's) have a variance
    as large as the signal, and sampling from it would teach the UNet noise.
    """
    pixels = batch["pixel_values"].to(device=vae.device, dtype=weight_dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    return denoising_loss(unet, noise_scheduler, latents, encode_captions(text_encoder, batch), noise, timesteps, snr_gamma=snr_gamma, unet_max_timestep=unet_max_timestep)


def prior_preservation_loss(instance_loss: torch.Tensor, prior_loss: torch.Tensor | None, prior_weight: float) -> torch.Tensor:
    """DreamBooth's objective (Ruiz et al. 2023, eq. 2; diffusers' ``--with_prior_preservation``):
    the loss on the user's pairs plus ``prior_weight`` times the loss on pairs the base model
    generated from prompts outside the upload; without prior pairs, the loss on the user's pairs."""
    return instance_loss if prior_loss is None else instance_loss + prior_weight * prior_loss


def encode_captions(text_encoder, batch) -> torch.Tensor:
    """Last hidden states; with knowledge, the linked entities' projections are injected."""
    if "entity_ids" in batch:
        return text_encoder(batch["input_ids"], batch["entity_ids"])
    return text_encoder(batch["input_ids"], return_dict=False)[0]


def plain_text_encoder(module):
    """The ``CLIPTextModel`` inside a knowledge wrapper (or the module itself)."""
    from ..knowledge import KnowledgeTextEncoder

    return module.text_encoder if isinstance(module, KnowledgeTextEncoder) else module
