"""One server for every face: the JSON API routes, with the Gradio UI mounted at ``/``.

``rapid-diffusion serve`` and ``app.py`` (Hugging Face Spaces) both call :func:`serve`.
Nothing is loaded at start-up (unless ``RAPID_DIFFUSION_PRELOAD`` says so, and on ZeroGPU, see
:mod:`.zerogpu`): the first request of a domain loads its model.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from .api import create_api_app
from ..models.registry import ModelRegistry
from ..service.app import AppService, GpuGate
from ..settings import settings
from .guards import BodyGuard, FileGuard
from .zerogpu import gpu_wrap, start

DEFAULT_PORT = 7860

log = logging.getLogger(__name__)


def max_upload() -> str:
    return settings().max_upload


def create_app(registry: ModelRegistry | None = None, gate: GpuGate | None = None) -> FastAPI:
    """The FastAPI app: ``/api/predict/{domain}``, ``/healthz``, and the UI (+ ``/gradio_api``) at ``/``."""
    import gradio as gr

    from .ui import CSS, I18N, build_ui

    import_model_classes()
    service = AppService(registry, gate, gpu=gpu_wrap())
    app = create_api_app(service)
    blocks = build_ui(service)
    blocks.queue(max_size=service.gate.max_waiting, default_concurrency_limit=service.gate.slots)
    app = gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        show_error=False,
        max_file_size=max_upload(),
        footer_links=["api", "gradio"],
        run_history=False,
        ssr_mode=False,
        css=CSS,
        i18n=I18N,
    )
    # Gradio checks the files an event names (only uploads for inputs) only once it counts as
    # launched, which mount_gradio_app never sets: without this, its own check is off.
    blocks.has_launched = True
    current = settings()
    if current.is_public and current.finetune_password is not None:
        log.warning("RAPID_DIFFUSION_FINETUNE_PASSWORD holds the owner's password in plain text; store its hash instead "
                    "(rapid-diffusion hash-password -> RAPID_DIFFUSION_FINETUNE_PASSWORD_HASH)")
    app.add_middleware(FileGuard)  # inner: sees each event's body, whole
    app.add_middleware(BodyGuard, upload_limit=current.max_upload_total, read_timeout=current.body_timeout)  # outer
    start(service)  # RAPID_DIFFUSION_PRELOAD; on ZeroGPU the models are loaded and moved to CUDA here
    return app


def import_model_classes() -> None:
    """Import the pipeline and tokenizer classes now, in one thread (no weights are loaded).

    diffusers and transformers import their classes lazily; two server threads doing that
    first import at once (a generation and the token counter) can fail with ImportError.
    """
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401


def default_host() -> str:
    """127.0.0.1 locally; 0.0.0.0 on Hugging Face Spaces (``SPACE_ID`` is set there)."""
    return settings().server_host


def default_port() -> int:
    return settings().port


def serve(host: str | None = None, port: int | None = None, registry: ModelRegistry | None = None) -> None:
    import uvicorn

    uvicorn.run(create_app(registry), host=host or default_host(), port=port or default_port(), log_level="info")
