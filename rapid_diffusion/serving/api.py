"""The PAI-EAS-compatible JSON face: ``POST /api/predict/{domain}``, ``GET /healthz``, the OpenAPI page ``/docs``.

Every ``/api/...`` route is a :class:`GuardedRoute`: before FastAPI reads or validates anything,
what another site's page could send is refused, the body is bounded, and the token is checked
when one is set (``RAPID_DIFFUSION_API_TOKEN``, both forms the official PAI-EAS client sends; see
:class:`rapid_diffusion.access.ApiTokenCheck`). FastAPI then validates the body against the
pydantic model of :mod:`.api_body` (one record, or a list of EasyNLP records), the service checks
and runs each request, and the result or the service's :class:`UserFacingError` becomes JSON.
``/healthz`` and ``/docs`` stay open: read-only, what the web UI shows anyone anyway. The UI's
Gradio queue and this API share the service's GPU gate. No gradio here.

(No ``from __future__ import annotations``: FastAPI reads the body's type, built at start-up from
the request limits, from the route's live annotation.)
"""

import asyncio
import json
import logging
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from ..generation.pipeline import GenerationCancelled
from ..generation.request import Limits
from ..messages import say
from ..service.app import AppService, UserFacingError
from ..settings import settings
from .api_body import body_type, record_model, refusal

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or 400: bad JSON, bad UTF-8, integers past Python's 4,300-digit limit
    (ValueError) and nesting deeper than the parser's stack (RecursionError) alike."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise UserFacingError(400, f"{say('body_not_json')}: {str(exc)[:120]}") from exc


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


# Content types a web page may send to another site without asking first (CORS "simple" requests).
SIMPLE_CONTENT_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


def refuse_cross_site(request: Request) -> None:
    """Any web page can make its visitors' browsers POST here; refuse what such a page can send.

    A browser adds ``Origin`` to every POST (the Fetch standard), so a request whose ``Origin`` is
    not this host is refused (403). A page on another site may send a body without asking first
    only as text/plain or a form, which are refused too (415), whatever the ``Origin``, for
    browsers older than that rule. JSON clients send another type (curl with its header, the EAS
    client ``application/octet-stream`` with a token), which a browser would first have to ask
    about, and this server never says yes; the EAS client without a token sends no type and no
    ``Origin``, and passes.
    """
    origin = request.headers.get("origin")
    if origin is not None:
        own = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")} - {""}
        if urlsplit(origin).netloc not in own:
            raise UserFacingError(403, say("cross_origin", origin=origin[:100]))
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in SIMPLE_CONTENT_TYPES:
        raise UserFacingError(415, say("json_content_type", got=content_type))


def check_token(request: Request, raw: bytes) -> None:
    """401 unless the request carries the API token (when one is set)."""
    check = settings().api_token_check
    if check is None:
        return
    headers = request.headers
    reason = check.refusal(
        headers.get("authorization"), method=request.method, path=request.url.path, body=raw,
        content_type=headers.get("content-type", ""), content_md5=headers.get("content-md5"), date=headers.get("date"), now=time.time(),
    )
    if reason is not None:
        raise UserFacingError(401, say(reason))


PREDICT_PATH = "/api/predict/{domain}"
NOT_POST = ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"]
DISCONNECT_POLL_SECONDS = 0.25


class GuardedRoute(APIRoute):
    """An ``/api/...`` route whose request is checked before FastAPI reads it (see the module docstring).

    The body read here is handed on as JSON whatever type it was sent as: the PAI-EAS client
    sends JSON as ``application/octet-stream``, which FastAPI would not parse.
    """

    def get_route_handler(self) -> Callable:
        handle = super().get_route_handler()
        predicts = self.path == PREDICT_PATH and "POST" in self.methods

        async def guarded(request: Request) -> Response:
            try:
                if predicts:
                    refuse_cross_site(request)
                raw = await read_limited_body(request)
                check_token(request, raw)
                if predicts:
                    parse_json(raw)
            except UserFacingError as exc:
                return error_response(exc, request, {"WWW-Authenticate": "EAS"} if exc.status == 401 else None)
            return await handle(as_json(request, raw))

        return guarded


def as_json(request: Request, raw: bytes) -> Request:
    """The same request, its body ``raw`` read again and typed as JSON."""
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + [(b"content-type", b"application/json")]
    replayed = False

    async def receive() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await request.receive()

    return Request({**request.scope, "headers": headers}, receive)


def error_response(exc: UserFacingError, request: Request, headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's one error shape, ``{"error", "field"}``; each rejection logs one line, no traceback."""
    log.info("%s %s -> %d (%s)", request.method, request.url.path, exc.status, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def run_while_connected(request: Request, work: Callable[[Callable[[], bool]], Any]) -> Any:
    """Run ``work(should_stop)`` in a worker thread; ``should_stop`` turns true once the client has gone.

    A client that gives up (a timeout, a closed tab) then frees its place in the GPU queue, or
    stops its denoising loop at the next step, instead of making everyone behind it wait. The
    owner's log gets one warning per client that left, and one per request the server cancelled.
    """
    gone = threading.Event()
    started = time.monotonic()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        gone.set()
        log.warning("%s %s: the client disconnected after %.1f s; its generation is cancelled "
                    "(the PAI-EAS client gives up after 5 s and sends the request again unless set_timeout allows more)",
                    request.method, request.url.path, time.monotonic() - started)

    watcher = asyncio.create_task(watch())
    try:
        return await run_in_threadpool(work, gone.is_set)
    except asyncio.CancelledError:
        log.warning("%s %s: cancelled by the server after %.1f s (shutting down)", request.method, request.url.path,
                    time.monotonic() - started)
        raise
    finally:
        watcher.cancel()


def build_api_router(service: AppService, record: type, limits: Limits) -> APIRouter:
    router = APIRouter(route_class=GuardedRoute)
    PredictBody = body_type(record, limits)  # noqa: N806 (a type)

    @router.post(PREDICT_PATH, response_model=None, summary="Generate images (PAI-EAS compatible; EasyNLP records)")
    async def predict(domain: str, request: Request, body: PredictBody) -> JSONResponse:
        """One record answers one object; a list of records (EasyNLP) answers a list in the same order."""
        records = body if isinstance(body, list) else [body]
        positions = range(len(records)) if isinstance(body, list) else [None]
        try:
            asked = [(one.request(), one.field_names(position)) for one, position in zip(records, positions)]
            spec = service.spec(domain)
            for gen_request, names in asked:
                service.check(gen_request, spec, names)  # every record before any runs
            results = await run_while_connected(request, lambda should_stop: [
                service.generate(gen_request, domain, should_stop=should_stop, field_names=names) for gen_request, names in asked])
        except UserFacingError as exc:
            return error_response(exc, request)
        except GenerationCancelled as exc:
            return JSONResponse({"error": str(exc), "field": None}, status_code=499)
        except Exception:
            log.exception("generation failed for domain %s", domain)
            return JSONResponse({"error": say("internal_error"), "field": None}, status_code=500)
        answers = [one.answer(result) for one, result in zip(records, results)]
        return JSONResponse(answers if isinstance(body, list) else answers[0])

    @router.api_route(PREDICT_PATH, methods=NOT_POST, include_in_schema=False)
    async def predict_wrong_method(domain: str, request: Request) -> JSONResponse:
        error = UserFacingError(405, say("method_not_allowed", method=request.method, allowed="POST"))
        return error_response(error, request, headers={"Allow": "POST"})

    @router.api_route("/api/{path:path}", methods=["POST", *NOT_POST], include_in_schema=False)
    async def unknown_api_path(path: str, request: Request) -> JSONResponse:
        """Every other ``/api/...`` path answers here, so the UI mounted at ``/`` never swallows it."""
        return error_response(UserFacingError(404, say("no_such_api", path=request.url.path[:200])), request)

    return router


def create_api_app(service: AppService) -> FastAPI:
    """A FastAPI app with the JSON routes; :mod:`rapid_diffusion.serving.server` mounts the UI on it.

    A token file that cannot be read stops the start here (ValueError), not at the first request.
    """
    settings().api_token_check  # noqa: B018 (read now: a bad token setting stops the start)
    limits = Limits.from_env()
    record = record_model(limits)
    known = [*record.model_fields, "prompt"]
    app = FastAPI(title="Rapid Diffusion", description="The PAI-EAS-compatible JSON API (docs/api.md).",
                  docs_url="/docs", redoc_url=None, openapi_url="/api/openapi.json")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(service.health))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(refusal(list(exc.errors()), known), request)

    app.include_router(build_api_router(service, record, limits))
    return app
