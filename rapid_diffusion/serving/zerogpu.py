"""Hugging Face ZeroGPU, as its documentation has it.

On ZeroGPU hardware (``SPACES_ZERO_GPU=true``, set by Hugging Face) a GPU is attached only while a
function decorated with ``spaces.GPU`` runs, and that function runs in a forked worker process:

* **One GPU function, picklable at its edges.** It is :meth:`AppService.generate_on_gpu`, called
  inside the GPU gate by every face (the web UI, the named API, the JSON API). A spec and requests
  go in; progress, previews and results come out as yielded values; no callable, lock or
  ``threading.Event`` crosses. Stopping closes the generator, which ``spaces`` forwards to the worker.
* **Models are moved to CUDA outside it.** :func:`start` loads the configured domains at start-up
  (``import spaces`` makes ``.to("cuda")`` register the weights; ``spaces`` moves them into the
  worker), and a domain first asked for later is loaded before its GPU call, never inside.
* **``duration`` per call**, estimated from the request (``service.app.gpu_seconds``).
* **Nothing compiles at run time** there: :func:`start` compiles the UNet of every preloaded domain
  whose level compiles ahead of time, in one GPU call each (``spaces.aoti_capture`` / ``aoti_compile``;
  :mod:`rapid_diffusion.speed.ahead_of_time`), before the weights are packed; a domain loaded later
  serves eager.

Off ZeroGPU nothing here imports ``spaces``: the GPU function runs in-process.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..service.app import AppService, GpuTask, GpuUnavailableError, GpuWrap, in_process
from ..settings import settings

log = logging.getLogger(__name__)


def gpu_wrap() -> GpuWrap:
    """``spaces.GPU`` on ZeroGPU hardware, :func:`in_process` everywhere else."""
    return spaces_gpu if settings().zero_gpu else in_process


def spaces_gpu(task: GpuTask, duration) -> GpuTask:
    """``spaces.GPU(duration=...)(task)``; the refusals ``spaces`` raises as ``gr.Error`` (quota spent,
    no GPU free in time, the worker failed) become :class:`GpuUnavailableError`, which every face
    answers with its own 503 / toast."""
    import gradio as gr
    import spaces

    on_gpu = spaces.GPU(duration=duration)(task)

    def call(*args, **kwargs):
        try:
            yield from on_gpu(*args, **kwargs)
        except gr.Error as exc:
            raise GpuUnavailableError(str(exc.message)) from exc

    return call


AOT_GPU_SECONDS = 1500  # the longest GPU call allowed at start-up (Hugging Face's ZeroGPU AoT guide)


def startup_gpu_call(task: Callable[[], Any]) -> Any:
    """Run ``task`` once in a ``spaces.GPU`` worker at start-up and return its (pickled) result."""
    import spaces

    return spaces.GPU(duration=AOT_GPU_SECONDS)(task)()


def preload_ids(service: AppService) -> list[str]:
    """``RAPID_DIFFUSION_PRELOAD`` (ids or ``all``); on ZeroGPU by default every domain of the owner's
    folders, at most ``RAPID_DIFFUSION_MAX_MODELS`` of them (more would be evicted again at once)."""
    current = settings()
    wanted = current.preload.strip() or ("all" if current.zero_gpu else "")
    if not wanted:
        return []
    ids = list(service.domains) if wanted == "all" else [d.strip() for d in wanted.split(",") if d.strip()]
    limit = service.registry.max_models
    if len(ids) > limit:
        log.warning("preloading %d of %d domains (%s): RAPID_DIFFUSION_MAX_MODELS=%d; raise it to keep them all loaded",
                    limit, len(ids), ", ".join(ids), limit)
    return ids[:limit]


def start(service: AppService) -> None:
    """At start-up: preload; on ZeroGPU then run what ``spaces`` runs at ``Blocks.launch`` (pack the
    registered weights, report the GPU functions), which a server that mounts Gradio into FastAPI
    never calls."""
    loaded = service.preload(preload_ids(service))
    if loaded:
        log.info("preloaded: %s", ", ".join(loaded))
    if settings().zero_gpu:
        states = service.compile_ahead_of_time(loaded, on_gpu=startup_gpu_call)
        if states:
            log.info("ahead-of-time compilation: %s", ", ".join(f"{d} {state}" for d, state in states.items()))
        from spaces import zero

        zero.startup()
