"""Rapid Diffusion: fast, domain-specific Chinese text-to-image generation and fine-tuning.

Importing the package loads no model and no heavy library; see ``registry`` and ``pipeline``.
"""

__version__ = "0.1.0"
