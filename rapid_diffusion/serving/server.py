"""One server for every face: the JSON API routes, with the Gradio UI mounted at ``/``.

``rapid-diffusion serve`` and ``app.py`` (Hugging Face Spaces) both call :func:`serve`.
Nothing is loaded at start-up: the first request of a domain loads its model.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI

from .api import create_api_app
from ..messages import say
from ..models.registry import ModelRegistry
from ..service.app import AppService, GpuGate
from ..settings import settings

DEFAULT_PORT = 7860
UPLOAD_PATH = "/gradio_api/upload"

log = logging.getLogger(__name__)


class BodyGuard:
    """ASGI middleware that bounds every request body as it arrives, before any route reads it.

    * Uploads (``/gradio_api/upload``) may carry ``upload_limit`` bytes in all: Gradio caps
      each file, not their sum, so one request of 40 files of 9 MB was accepted. Past the
      budget the client gets 413 at once, whatever the declared length said.
    * A body whose next piece takes longer than ``read_timeout`` seconds gets 408, so slow
      clients cannot hold connections open forever.

    The guard answers itself and then tells the route that the client has left (an
    ``http.disconnect``), so the route stops reading; anything it still sends is dropped.
    """

    def __init__(self, app, upload_limit: int, read_timeout: float):
        self.app = app
        self.upload_limit = upload_limit
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"].rstrip("/") == UPLOAD_PATH else None
        if limit is not None and declared_length(scope) > limit:
            return await self.refuse(send, scope, 413, say("upload_too_large", limit=megabytes(limit)))
        state = {"received": 0, "body_done": False, "answered": False, "app_started": False}

        async def guarded_receive():
            if state["answered"]:
                return {"type": "http.disconnect"}
            if state["body_done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:
                return await self.cut_off(send, scope, state, 408, say("body_timeout"))
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
                if limit is not None and state["received"] > limit:
                    return await self.cut_off(send, scope, state, 413, say("upload_too_large", limit=megabytes(limit)))
            return message

        async def guarded_send(message):
            if state["answered"]:
                return
            state["app_started"] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not state["answered"]:
                raise

    async def cut_off(self, send, scope, state, status: int, message: str) -> dict:
        """Answer ``status`` unless the route already answered; the route then sees the client leave."""
        if not state["app_started"]:
            await self.refuse(send, scope, status, message)
        state["answered"] = True
        return {"type": "http.disconnect"}

    @staticmethod
    async def refuse(send, scope, status: int, message: str) -> None:
        log.info("%s %s -> %d (%s)", scope["method"], scope["path"], status, message)
        body = json.dumps({"error": message, "field": None}, ensure_ascii=False).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def declared_length(scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def megabytes(size: int) -> str:
    return f"{size / 2**20:.0f} MB"


def max_upload() -> str:
    return settings().max_upload


def create_app(registry: ModelRegistry | None = None, gate: GpuGate | None = None) -> FastAPI:
    """The FastAPI app: ``/api/predict/{domain}``, ``/healthz``, and the UI (+ ``/gradio_api``) at ``/``."""
    import gradio as gr

    from .ui import CSS, I18N, build_ui

    import_model_classes()
    service = AppService(registry, gate)
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
    current = settings()
    app.add_middleware(BodyGuard, upload_limit=current.max_upload_total, read_timeout=current.body_timeout)
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
