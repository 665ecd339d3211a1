"""Rapid Diffusion: fast, domain-specific Chinese text-to-image generation and fine-tuning.

The package is split into rooms, one per concern, whose imports point one way (``.importlinter``):
``serving`` (the faces) -> ``service`` -> ``training`` -> ``models`` -> ``speed`` | ``knowledge`` |
``upscaling`` | ``demo`` -> ``generation`` -> the foundation modules (``domains``, ``paths``,
``settings``, ``messages``, ``errors``). Importing the package loads no model and no heavy
library; see ``models.registry`` and ``generation.pipeline``.
"""

__version__ = "0.1.0"
