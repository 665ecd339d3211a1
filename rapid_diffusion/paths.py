"""Where the project's files live: the checkout (domains/, assets/) and the user's home folder."""

from __future__ import annotations

from pathlib import Path

from .settings import settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = PROJECT_ROOT / "assets"


def home_dir() -> Path:
    """``$RAPID_DIFFUSION_HOME`` (default ``~/.rapid-diffusion``): fine-tuned models, jobs, user domains."""
    return settings().home
