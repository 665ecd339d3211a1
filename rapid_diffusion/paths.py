"""Where the product's files live: its package data, and the user's home folder.

What ships (the four domain files, the demo model, the demo SR weights, the demo knowledge
graph) is package data under ``rapid_diffusion/data/``, found through :mod:`importlib.resources`,
so a wheel installed anywhere carries it; the checkout has the same files in the same place
(one copy). The domain files name the model by a path relative to themselves
(``../assets/demo-model``), which holds in both. What a user adds (fine-tuned and imported
models, their domains, jobs, caches) lives under ``$RAPID_DIFFUSION_HOME``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .settings import settings


def _package_data() -> Path:
    data = files(__package__) / "data"
    if not isinstance(data, Path):  # e.g. imported from a zip: diffusers and torch need real files
        raise RuntimeError(f"rapid_diffusion's data must be installed as files, not inside an archive ({data})")
    return data


DATA_DIR = _package_data()
SHIPPED_DOMAINS_DIR = DATA_DIR / "domains"
ASSETS_DIR = DATA_DIR / "assets"
DEMO_MODEL_DIR = ASSETS_DIR / "demo-model"
DEMO_SR_WEIGHTS = ASSETS_DIR / "demo-sr.safetensors"
DEMO_KNOWLEDGE_GRAPH = ASSETS_DIR / "demo-kg"


def home_dir() -> Path:
    """``$RAPID_DIFFUSION_HOME`` (default ``~/.rapid-diffusion``): fine-tuned models, jobs, user domains."""
    return settings().home


def models_dir() -> Path:
    """Where imported models are written (``$RAPID_DIFFUSION_HOME/models/<id>``); fine-tuned ones live in their job folders."""
    return home_dir() / "models"
