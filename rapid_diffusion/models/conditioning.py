"""Prompt encoders for text encoders whose output is not the per-token states diffusers passes on.

A model imported from EasyNLP's Wukong latent diffusion conditions its UNet on one vector per
prompt: the projected, L2-normalised state at ``[SEP]``, repeated ``repeat`` times (see
:mod:`.wukong`). Its text encoder's config says so; :func:`prompt_encoder_for` returns the
matching drop-in for ``pipe.encode_prompt`` (None for ordinary models).
"""

from __future__ import annotations

import torch

from ..generation.pipeline import tokenize

# A text encoder config's field: {"pooled": true, "normalize": bool, "repeat": int}.
CONDITIONING_ATTRIBUTE = "rapid_diffusion_conditioning"


def own_conditioning(text_encoder) -> dict | None:
    """The conditioning rule a text encoder's config carries, or None for per-token states."""
    rule = getattr(text_encoder.config, CONDITIONING_ATTRIBUTE, None)
    return rule if isinstance(rule, dict) and rule.get("pooled") else None


def prompt_encoder_for(pipe):
    rule = own_conditioning(pipe.text_encoder)
    if rule is None:
        return None
    return PooledPromptEncoder(pipe, normalize=bool(rule.get("normalize", True)), repeat=int(rule.get("repeat", 1)))


class PooledPromptEncoder:
    """``encoder(prompt, device, num_images_per_prompt, do_cfg, negative_prompt)`` like
    ``pipe.encode_prompt``, giving (B, repeat, projection_dim) embeddings. The unconditional
    embedding is that of the negative prompt, or of "" (what EasyNLP uses) when there is none."""

    def __init__(self, pipe, normalize: bool, repeat: int):
        self.pipe = pipe
        self.normalize = normalize
        self.repeat = repeat

    def __call__(self, prompt: str, device, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                 negative_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        positive = self.embed(prompt, device).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return positive, None
        return positive, self.embed(negative_prompt or "", device).repeat_interleave(num_images_per_prompt, dim=0)

    def embed(self, text: str, device) -> torch.Tensor:
        ids = tokenize(self.pipe.tokenizer, [text]).to(device)
        pooled = self.pipe.text_encoder(ids).text_embeds
        if self.normalize:
            pooled = pooled / torch.linalg.norm(pooled, dim=-1, keepdim=True)
        return pooled[:, None, :].repeat(1, self.repeat, 1)
