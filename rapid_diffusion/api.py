"""The service layer shared by the web UI and the PAI-EAS-compatible JSON endpoint.

Both faces call :func:`run_generation`, which takes a slot of the :class:`GpuGate` and then
calls the core's ``pipeline.generate``: the UI's Gradio queue and the JSON API share the
same bound on concurrent GPU work. Errors become :class:`UserFacingError` (an HTTP status,
the field at fault, and one bilingual sentence), never a traceback. No gradio here.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from . import pipeline
from .domains import DomainSpec
from .pipeline import GenerationCancelled, GenerationRequest, GenerationResult, RequestError
from .registry import ModelRegistry, ModelUnavailableError
from .settings import settings

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
OOM_ADVICE = (
    "显存不足：请减少图片数量或缩小尺寸后重试。 / Out of GPU memory: try fewer images or a smaller size."
)

INTERNAL_ERROR = "服务器内部错误，请稍后再试。 / Internal server error; please try again later."


class QueueFullError(RuntimeError):
    """More requests are waiting for the GPU than the server accepts."""


@dataclass
class UserFacingError(Exception):
    """What a user is told: an HTTP status, the request field at fault (if any), a sentence."""

    status: int
    message: str
    field: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}


class GpuGate:
    """At most ``slots`` generations run at once; at most ``max_waiting`` wait for a slot.

    ``RAPID_DIFFUSION_CONCURRENCY`` (default 1 per GPU) and ``RAPID_DIFFUSION_QUEUE_SIZE``
    (default 16) configure the server's gate; the UI's Gradio queue uses the same numbers.
    """

    def __init__(self, slots: int = 1, max_waiting: int | None = None):
        self.slots = slots
        self.max_waiting = max_waiting
        self._semaphore = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self._waiting = 0

    @classmethod
    def from_env(cls) -> "GpuGate":
        return cls(gpu_concurrency(), queue_size())

    @contextmanager
    def slot(self):
        with self._lock:
            if self.max_waiting is not None and self._waiting >= self.max_waiting:
                raise QueueFullError(f"{self._waiting} requests are already waiting")
            self._waiting += 1
        try:
            self._semaphore.acquire()
        finally:
            with self._lock:
                self._waiting -= 1
        try:
            yield
        finally:
            self._semaphore.release()


def gpu_concurrency() -> int:
    return settings().concurrency or max(1, torch.cuda.device_count())


def queue_size() -> int:
    return settings().queue_size


def zero_gpu(fn: Callable, duration: int = 120) -> Callable:
    """``spaces.GPU(fn)`` on Hugging Face ZeroGPU hardware; ``fn`` itself everywhere else."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


def run_generation(
    registry: ModelRegistry,
    gate: GpuGate,
    request: GenerationRequest,
    spec: DomainSpec,
    progress: pipeline.ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Validate (the core's rules), wait for a GPU slot, generate; errors become user-facing."""
    try:
        resolved = request.resolve(spec)
        with gate.slot():
            return pipeline.generate(resolved, spec, registry=registry, progress=progress, should_stop=should_stop)
    except RequestError as exc:
        raise UserFacingError(422, f"参数 {exc.field} 无效 / Invalid {exc}", exc.field) from exc
    except QueueFullError as exc:
        raise UserFacingError(503, "队列已满，请稍后再试。 / The queue is full; please try again shortly.") from exc
    except ModelUnavailableError as exc:
        raise UserFacingError(503, str(exc), "domain") from exc
    except torch.cuda.OutOfMemoryError as exc:
        release_gpu_memory()
        raise UserFacingError(503, OOM_ADVICE) from exc


def release_gpu_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def find_spec(registry: ModelRegistry, domain_id: str) -> DomainSpec:
    try:
        return registry.spec(domain_id)
    except KeyError:
        known = ", ".join(registry.domains)
        raise UserFacingError(404, f"未知领域 / Unknown domain '{domain_id}'; known: {known}", "domain") from None


def parse_predict_body(raw: bytes) -> GenerationRequest:
    """A PAI-EAS body -> request. Types are checked here; ranges by the core's ``resolve``."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserFacingError(400, f"请求体不是合法 JSON / The body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise UserFacingError(400, "请求体须为 JSON 对象 / The body must be a JSON object")
    for name, value in body.items():
        if name not in API_FIELDS:
            raise UserFacingError(422, f"未知字段 / Unknown field '{name}'; known: {', '.join(API_FIELDS)}", name)
        if value is not None and not _has_type(value, API_FIELDS[name]):
            expected = API_FIELDS[name].__name__
            raise UserFacingError(422, f"字段类型错误 / '{name}' must be {expected}, got {value!r}", name)
    if "text" not in body:
        raise UserFacingError(422, "缺少字段 / Missing field 'text' (the prompt)", "text")
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
    too_large = UserFacingError(413, f"请求体超过 {limit} 字节 / The body exceeds {limit} bytes")
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


def health(registry: ModelRegistry) -> dict[str, Any]:
    """Liveness (answering at all) and readiness (which domains can serve without a download)."""
    states = {spec.id: registry.state(spec) for spec in registry.domains.values()}
    ready = [d for d, state in states.items() if state in ("loaded", "offline-ready", "cached")]
    return {"status": "ok", "ready": bool(ready), "domains": states, "loaded": [m.key for m in registry.loaded()]}


def build_api_router(registry: ModelRegistry, gate: GpuGate) -> APIRouter:
    router = APIRouter()
    gpu_generate = zero_gpu(lambda gen_request, spec: run_generation(registry, gate, gen_request, spec))

    @router.post("/api/predict/{domain}")
    async def predict(domain: str, request: Request) -> JSONResponse:
        try:
            raw = await read_limited_body(request)
            spec = find_spec(registry, domain)
            gen_request = parse_predict_body(raw)
            result = await run_in_threadpool(gpu_generate, gen_request, spec)
        except UserFacingError as exc:
            body = {**exc.body(), "field": API_FIELD_NAMES.get(exc.field, exc.field)}
            return JSONResponse(body, status_code=exc.status)
        except GenerationCancelled as exc:
            return JSONResponse({"error": str(exc), "field": None}, status_code=499)
        except Exception:
            log.exception("generation failed for domain %s", domain)
            return JSONResponse({"error": INTERNAL_ERROR, "field": None}, status_code=500)
        return JSONResponse(predict_response(result))

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(health, registry))

    return router


def create_api_app(registry: ModelRegistry, gate: GpuGate) -> FastAPI:
    """A FastAPI app with the JSON routes; :mod:`rapid_diffusion.server` mounts the UI on it."""
    app = FastAPI(title="Rapid Diffusion", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.include_router(build_api_router(registry, gate))
    return app
