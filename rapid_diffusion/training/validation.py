"""What a run shows of itself: images rendered at a fixed seed, and a loss comparable across steps.

:func:`render` draws prompts with the model as it is (the base, before training: the prior pairs
and the "before" images; any step: samples). :class:`Validator` renders the validation prompts
(the held-out captions unless prompts were given) every ``--validation-every`` steps, the prompts
from outside the upload before and after training, and measures the loss on the held-out pairs
at fixed timesteps and noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..domains import DomainSpec
from .core import diffusion_loss, plain_text_encoder
from .options import TrainConfig
from .run_files import OUTSIDE_DIR, SAMPLES_DIR, RunFiles, step_folder

RENDER_BATCH = 8
VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Sampling:
    """How images are drawn: the base domain's sampling settings (guidance, negative prompt) at the run's size."""

    steps: int
    guidance_scale: float
    negative_prompt: str
    resolution: int

    @classmethod
    def of(cls, config: TrainConfig, base_spec: DomainSpec | None, resolution: int) -> Sampling:
        return cls(
            steps=config.validation_inference_steps,
            guidance_scale=base_spec.guidance_scale if base_spec else 7.5,
            negative_prompt=base_spec.negative_prompt if base_spec else "",
            resolution=resolution,
        )


@torch.no_grad()
def render(components: dict, prompts: list[str], seeds: list[int], sampling: Sampling, device, autocast, knowledge=None,
           progress=None) -> list[Image.Image]:
    """One image per (prompt, seed), in batches of :data:`RENDER_BATCH`; image ``i`` from its own
    generator seeded ``seeds[i]`` (the same image whatever the batch). ``components`` are a
    pipeline's (the UNet and text encoder as they are now); ``progress(done)`` after each batch."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    modes = [(m, m.training) for m in (pipe.unet, pipe.text_encoder)]
    for module, _ in modes:
        module.eval()
    try:
        images = []
        for start in range(0, len(prompts), RENDER_BATCH):
            chunk, chunk_seeds = prompts[start:start + RENDER_BATCH], seeds[start:start + RENDER_BATCH]
            with autocast():
                images += pipe(
                    **prompt_arguments(pipe, chunk, sampling.negative_prompt, knowledge),
                    num_inference_steps=sampling.steps,
                    guidance_scale=sampling.guidance_scale,
                    height=sampling.resolution,
                    width=sampling.resolution,
                    generator=[torch.Generator(device).manual_seed(seed) for seed in chunk_seeds],
                ).images
            if progress is not None:
                progress(len(images))
        return images
    finally:
        for module, was_training in modes:
            module.train(was_training)


def prompt_arguments(pipe, prompts: list[str], negative_prompt: str, knowledge) -> dict:
    """The prompts as text, or as embeddings with the entities injected (the way generation does)."""
    if knowledge is None:
        return {"prompt": prompts, "negative_prompt": [negative_prompt] * len(prompts) if negative_prompt else None}
    from ..knowledge import KnowledgeTextEncoder

    encoder = KnowledgeTextEncoder(pipe.text_encoder, knowledge.injector)

    def embed(texts: list[str]) -> torch.Tensor:
        tokens = knowledge.tokenize(pipe.tokenizer, texts)
        device = pipe.text_encoder.device
        return encoder(tokens.input_ids.to(device), tokens.entity_ids.to(device)).to(pipe.text_encoder.dtype)

    return {"prompt_embeds": embed(prompts), "negative_prompt_embeds": embed([negative_prompt] * len(prompts))}


def save_images(images: list[Image.Image], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    return folder


class Validator:
    """Renders the validation prompts at a fixed seed (step 0 shows the base model, the "before"),
    the outside prompts before and after, and measures the loss on the fit batch (the held-out
    pairs, else a few training pairs) at fixed timesteps and noise (comparable over steps)."""

    def __init__(self, config: TrainConfig, pipe, accelerator, files: RunFiles, sampling: Sampling, outside_prompts: list[str],
                 knowledge=None, held_out=(), fit_batch=None, vae=None, noise_scheduler=None, weight_dtype=torch.float32):
        self.prompts = list(config.validation_prompts) or [pair.text for pair in held_out]
        self.outside_prompts = list(outside_prompts)
        self.held_out = bool(held_out)
        self.knowledge = knowledge
        self.seed = config.seed
        self.pipe = pipe
        self.accelerator = accelerator
        self.files = files
        self.sampling = sampling
        self.fit_batch = fit_batch
        self.vae, self.noise_scheduler, self.weight_dtype = vae, noise_scheduler, weight_dtype
        files.update(validation_prompts=self.prompts, outside_prompts=self.outside_prompts, validation_seed=self.seed)

    def render(self, step: int, unet, text_encoder, ema, final: bool = False) -> float | None:
        """Samples (and, before and after, the outside prompts) of ``step``; returns the fit loss."""
        fit_loss = None
        if self.accelerator.is_main_process:
            before_or_after = step == 0 or final
            if self.fit_batch is not None and (self.held_out or before_or_after):
                fit_loss = self._fit_loss(unet, text_encoder)
                if self.held_out:
                    self.files.log_validation_loss(step, fit_loss)
            prompts = self.prompts + (self.outside_prompts if before_or_after else [])
            if prompts:
                images = self._images(unet, text_encoder, ema, prompts)
                if self.prompts:
                    folder = save_images(images[:len(self.prompts)], step_folder(self.files.folder / SAMPLES_DIR, step))
                    self.files.update(latest_samples=str(folder), **({"final_samples": str(folder)} if final else {}))
                if before_or_after and self.outside_prompts:
                    save_images(images[len(self.prompts):], step_folder(self.files.folder / OUTSIDE_DIR, step))
        self.accelerator.wait_for_everyone()
        return fit_loss

    @torch.no_grad()
    def _fit_loss(self, unet, text_encoder) -> float:
        """Mean loss over the fit batch x a few fixed timesteps, with seeded noise."""
        unet, text_encoder = self.accelerator.unwrap_model(unet), self.accelerator.unwrap_model(text_encoder)
        modes = [(m, m.training) for m in (unet, text_encoder)]
        for module, _ in modes:
            module.eval()
        try:
            device = self.accelerator.device
            batch = {k: v.to(device) for k, v in self.fit_batch.items()}
            total = self.noise_scheduler.config.num_train_timesteps
            generator = torch.Generator().manual_seed(self.seed)
            losses = []
            for fraction in VALIDATION_TIMESTEPS:
                size = len(batch["input_ids"])
                timesteps = torch.full((size,), int(fraction * (total - 1)), device=device, dtype=torch.long)
                noise = torch.randn((size, *self._latent_shape()), generator=generator).to(device)
                with self.accelerator.autocast():
                    losses.append(diffusion_loss(batch, unet, text_encoder, self.vae, self.noise_scheduler, self.weight_dtype, noise, timesteps).item())
            return float(np.mean(losses))
        finally:
            for module, was_training in modes:
                module.train(was_training)

    def _latent_shape(self) -> tuple[int, int, int]:
        side = self.sampling.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.vae.config.latent_channels, side, side

    def _images(self, unet, text_encoder, ema, prompts: list[str]) -> list[Image.Image]:
        unwrapped = self.accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(unwrapped.parameters())
            ema.copy_to(unwrapped.parameters())
        try:
            plain = plain_text_encoder(self.accelerator.unwrap_model(text_encoder))
            components = dict(self.pipe.components, unet=unwrapped, text_encoder=plain)
            return render(components, prompts, [self.seed] * len(prompts), self.sampling, self.accelerator.device,
                          self.accelerator.autocast, self.knowledge)
        finally:
            if ema is not None:
                ema.restore(unwrapped.parameters())
