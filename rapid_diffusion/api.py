"""The PAI-EAS-compatible JSON face: ``POST /api/predict/{domain}`` and ``GET /healthz``.

It turns a JSON body into a :class:`GenerationRequest`, calls :class:`AppService`, and turns
the result or the service's :class:`UserFacingError` into JSON. The UI's Gradio queue and this
API share the service's GPU gate. No gradio here.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from .messages import say
from .pipeline import GenerationCancelled, GenerationRequest, GenerationResult
from .service import AppService, UserFacingError, zero_gpu

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
API_FIELD_NAMES = {"prompt": "text"}


def parse_predict_body(raw: bytes) -> GenerationRequest:
    """A PAI-EAS body -> request. Types are checked here; ranges by the core's ``resolve``."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserFacingError(400, f"{say('body_not_json')}: {exc}") from exc
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
    return GenerationRequest(
        prompt=body["text"],
        negative_prompt=body.get("negative_prompt"),
        num_inference_steps=body.get("num_inference_steps"),
        guidance_scale=body.get("guidance_scale"),
        seed=body.get("seed"),
        num_images=1 if body.get("num_images") is None else body["num_images"],
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


def build_api_router(service: AppService) -> APIRouter:
    router = APIRouter()
    gpu_generate = zero_gpu(lambda gen_request, domain: service.generate(gen_request, domain))

    @router.post("/api/predict/{domain}")
    async def predict(domain: str, request: Request) -> JSONResponse:
        try:
            raw = await read_limited_body(request)
            service.spec(domain)
            gen_request = parse_predict_body(raw)
            result = await run_in_threadpool(gpu_generate, gen_request, domain)
        except UserFacingError as exc:
            body = {**exc.body(), "field": API_FIELD_NAMES.get(exc.field, exc.field)}
            return JSONResponse(body, status_code=exc.status)
        except GenerationCancelled as exc:
            return JSONResponse({"error": str(exc), "field": None}, status_code=499)
        except Exception:
            log.exception("generation failed for domain %s", domain)
            return JSONResponse({"error": say("internal_error"), "field": None}, status_code=500)
        return JSONResponse(predict_response(result))

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(service.health))

    return router


def create_api_app(service: AppService) -> FastAPI:
    """A FastAPI app with the JSON routes; :mod:`rapid_diffusion.server` mounts the UI on it."""
    app = FastAPI(title="Rapid Diffusion", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.include_router(build_api_router(service))
    return app
