"""Shared fixtures: tiny random-weight pipelines of the exact PAI classes, built in code.

Tests never touch the network: HF_HUB_OFFLINE is forced on before anything imports the hub.
"""

from __future__ import annotations

import os

import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# Nothing a test does (caches of converted models, fine-tuned domains) lands in the real home folder.
os.environ["RAPID_DIFFUSION_HOME"] = tempfile.mkdtemp(prefix="rapid-diffusion-tests-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# A worker per core (pytest-xdist): one thread each, inherited by the CLIs and servers tests start, so
# an image made in a subprocess equals one made here bit for bit (float sums depend on the thread count).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import shutil
from pathlib import Path

import pytest
import torch
from helpers import write_domain

# Two threads, as a 2-core host has; one per worker when pytest-xdist runs a worker per core.
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch):
    """The product reads its settings once; a test that changes the environment gets them re-read."""
    from rapid_diffusion import settings

    for name in ("setenv", "delenv"):
        original = getattr(monkeypatch, name)

        def changed(*args, _original=original, **kwargs):
            _original(*args, **kwargs)
            settings.reload()

        setattr(monkeypatch, name, changed)
    settings.reload()
    yield
    monkeypatch.undo()
    settings.reload()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionPipeline folder (CLIPTextModel + BertTokenizer + ...), safetensors."""
    from diffusers.utils import logging as diffusers_logging

    from rapid_diffusion.models.factory import build_pipeline

    diffusers_logging.disable_progress_bar()
    folder = tmp_path_factory.mktemp("tiny-pai-model")
    build_pipeline(folder, size="tiny", seed=0)
    return folder


@pytest.fixture()
def test_domains(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A domains folder with one domain, 'tiny', on the tiny model; exported via the env var.

    RAPID_DIFFUSION_HOME points to an empty temp folder so user domains do not leak in.
    """
    folder = tmp_path / "domains"
    folder.mkdir()
    write_domain(folder, "tiny", tiny_model_dir)
    monkeypatch.setenv("RAPID_DIFFUSION_DOMAINS", str(folder))
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    # The process-wide registry reads the domains when it is created: start a fresh one here.
    import rapid_diffusion.models.registry

    monkeypatch.setattr(rapid_diffusion.models.registry, "_default_registry", None)
    return folder


@pytest.fixture()
def registry(test_domains):
    """A fresh registry on CPU/fp32 that sees the test domains."""
    from rapid_diffusion.models.registry import ModelRegistry

    return ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture()
def copy_model(tmp_path, tiny_model_dir):
    def _copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(tiny_model_dir, target)
        return target

    return _copy


def pytest_collection_modifyitems(items):
    """Files with a slow or browser test run first. pytest-xdist (``--dist loadfile``) hands whole files to
    its workers in collection order: a long file handed out last would keep one worker busy while the
    other idles. The order inside a file is kept."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("browser")}
    items.sort(key=lambda item: item.path not in heavy)
