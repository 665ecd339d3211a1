"""The PAI-EAS-compatible JSON face: ``POST /api/predict/{domain}`` and ``GET /healthz``.

It turns a JSON body into a :class:`GenerationRequest`, calls :class:`AppService`, and turns
the result or the service's :class:`UserFacingError` into JSON. The UI's Gradio queue and this
API share the service's GPU gate. No gradio here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from typing import Any, Callable
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..messages import say
from ..generation.pipeline import GenerationCancelled, GenerationResult
from ..generation.request import GenerationRequest
from ..service.app import AppService, UserFacingError
from ..service.inputs import request_from_inputs

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
API_FIELDS = {
    "text": str,
    "negative_prompt": str,
    "num_inference_steps": int,
    "guidance_scale": float,
    "seed": int,
    "num_images": int,
    "super_resolution": bool,
}
# A refusal names the field as the client sent it (the request's ``prompt`` is the body's ``text``).
API_FIELD_NAMES = {name: (name, name) for name in API_FIELDS} | {"prompt": ("text", "text")}


def parse_predict_body(raw: bytes) -> GenerationRequest:
    """A PAI-EAS body -> request. Types are checked here; ranges by the core's ``resolve``."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and integers past Python's 4,300-digit limit;
        # RecursionError, nesting deeper than the parser's stack.
        raise UserFacingError(400, f"{say('body_not_json')}: {str(exc)[:120]}") from exc
    if not isinstance(body, dict):
        raise UserFacingError(400, say("body_not_object"))
    for name, value in body.items():
        if name not in API_FIELDS:
            raise UserFacingError(422, say("unknown_field", field=name, known=", ".join(API_FIELDS)), name)
        if value is not None and not _has_type(value, API_FIELDS[name]):
            expected = API_FIELDS[name].__name__
            raise UserFacingError(422, say("wrong_type", field=name, expected=expected, value=repr(value)[:40]), name)
    if "text" not in body:
        raise UserFacingError(422, say("missing_text"), "text")
    return request_from_inputs(
        body["text"],
        negative_prompt=body.get("negative_prompt"),
        num_inference_steps=body.get("num_inference_steps"),
        guidance_scale=body.get("guidance_scale"),
        seed=body.get("seed"),
        num_images=body.get("num_images"),
        super_resolution=body.get("super_resolution"),
    )


def _has_type(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


async def read_limited_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, or 413 as soon as it exceeds ``limit`` (declared or streamed)."""
    too_large = UserFacingError(413, say("body_too_large", limit=limit))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def predict_response(result: GenerationResult) -> dict[str, Any]:
    return {
        "text": result.settings["prompt"],
        "images_base64": [base64.b64encode(result.png_bytes(i)).decode("ascii") for i in range(len(result.images))],
        "seeds": result.seeds,
        "timings": result.timings,
        "notes": result.notes,
    }


# Content types a web page may send to another site without asking first (CORS "simple" requests).
SIMPLE_CONTENT_TYPES = ("", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


def refuse_cross_site(request: Request) -> None:
    """Any web page can make its visitors' browsers POST here; refuse what such a page can send.

    A page on another site may send a body without asking first only as text/plain, a form, or with
    no type; JSON clients (curl with its header, the EAS client's octet-stream) send another type,
    which a browser would first have to ask about, and this server never says yes. A request whose
    ``Origin`` is not this host is refused too.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in SIMPLE_CONTENT_TYPES:
        raise UserFacingError(415, say("json_content_type", got=content_type or "none"))
    origin = request.headers.get("origin")
    if origin is not None:
        own = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")} - {""}
        if urlsplit(origin).netloc not in own:
            raise UserFacingError(403, say("cross_origin", origin=origin[:100]))


NOT_POST = ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"]
DISCONNECT_POLL_SECONDS = 0.25


def error_response(exc: UserFacingError, request: Request, headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's one error shape, ``{"error", "field"}``; each rejection logs one line, no traceback."""
    log.info("%s %s -> %d (%s)", request.method, request.url.path, exc.status, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def run_while_connected(request: Request, work: Callable[[Callable[[], bool]], Any]) -> Any:
    """Run ``work(should_stop)`` in a worker thread; ``should_stop`` turns true once the client has gone.

    A client that gives up (a timeout, a closed tab) then frees its place in the GPU queue, or
    stops its denoising loop at the next step, instead of making everyone behind it wait.
    """
    gone = threading.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        gone.set()
        log.info("%s %s: client disconnected; its generation is cancelled", request.method, request.url.path)

    watcher = asyncio.create_task(watch())
    try:
        return await run_in_threadpool(work, gone.is_set)
    finally:
        watcher.cancel()


def build_api_router(service: AppService) -> APIRouter:
    router = APIRouter()

    @router.post("/api/predict/{domain}")
    async def predict(domain: str, request: Request) -> JSONResponse:
        try:
            refuse_cross_site(request)
            raw = await read_limited_body(request)
            service.spec(domain)
            gen_request = parse_predict_body(raw)
            result = await run_while_connected(
                request, lambda should_stop: service.generate(gen_request, domain, should_stop=should_stop, field_names=API_FIELD_NAMES))
        except UserFacingError as exc:
            return error_response(exc, request)
        except GenerationCancelled as exc:
            return JSONResponse({"error": str(exc), "field": None}, status_code=499)
        except Exception:
            log.exception("generation failed for domain %s", domain)
            return JSONResponse({"error": say("internal_error"), "field": None}, status_code=500)
        return JSONResponse(predict_response(result))

    @router.api_route("/api/predict/{domain}", methods=NOT_POST, include_in_schema=False)
    async def predict_wrong_method(domain: str, request: Request) -> JSONResponse:
        error = UserFacingError(405, say("method_not_allowed", method=request.method, allowed="POST"))
        return error_response(error, request, headers={"Allow": "POST"})

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(service.health))

    @router.api_route("/api/{path:path}", methods=["POST", *NOT_POST], include_in_schema=False)
    async def unknown_api_path(path: str, request: Request) -> JSONResponse:
        """Every other ``/api/...`` path answers here, so the UI mounted at ``/`` never swallows it."""
        return error_response(UserFacingError(404, say("no_such_api", path=request.url.path[:200])), request)

    return router


def create_api_app(service: AppService) -> FastAPI:
    """A FastAPI app with the JSON routes; :mod:`rapid_diffusion.serving.server` mounts the UI on it."""
    app = FastAPI(title="Rapid Diffusion", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.include_router(build_api_router(service))
    return app
