"""The service layer: the one place the faces (``ui.py``, ``api.py``, ``cli.py``) call.

:class:`AppService` owns the model registry and the GPU gate and offers what a person can do:
pick a domain, count a prompt's tokens, generate, ask for the server's health; its
``models`` (:mod:`.models`) lists, loads, unloads, renames, deletes, exports and imports
models, and its ``finetune`` (:mod:`.finetune`) starts and watches fine-tuning jobs,
answering refusals with the sentence to show. Every other failure leaves here as a
:class:`UserFacingError` (an HTTP status, the field at fault, one bilingual sentence from
:mod:`rapid_diffusion.messages`); faces only translate
widgets, JSON or flags into these calls, and errors into their own form (a toast, a JSON
body, a line on stderr). No web framework is imported here.
"""

from __future__ import annotations

import logging
import math
import pickle
import queue
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .batching import GpuGate, Member, QueueFullError
from ..domains import DomainSpec, ModelSource
from .finetune import FinetuneService
from ..training.jobs import JobManager
from .models import ModelsService
from ..messages import say
from ..generation.pipeline import GenerationCancelled, GenerationResult
from ..generation.request import GenerationRequest, PromptReport, RequestError, inspect_prompt
from ..generation.pipeline import ProgressCallback, batch_key
from ..generation.preview import PreviewCallback
from ..models.registry import ModelRegistry, ModelUnavailableError, adhoc_spec, default_registry, native_size
from ..settings import settings
from ..errors import UserFacingError

log = logging.getLogger(__name__)

READY_STATES = ("loaded", "offline-ready", "cached")

__all__ = ["AppService", "GenerationCancelled", "GpuGate", "GpuUnavailableError", "QueueFullError", "UserFacingError", "in_process"]


class GpuUnavailableError(RuntimeError):
    """The host lent no GPU for this call (ZeroGPU: quota spent, none free in time); the message says why."""


# ----------------------------------------------------------------------------- the GPU call
#
# Everything a generation computes runs in one function, :meth:`AppService.generate_on_gpu`, called
# inside the GPU gate. On a ZeroGPU Space ``spaces.GPU`` runs it in a forked worker process that holds
# the GPU (serving/zerogpu.py); so what goes in (a spec and requests) and what comes out (the events
# below) must pickle, no callable crosses, and the models are loaded before the call, outside it.
# Elsewhere the same function runs in-process (:func:`in_process`).


@dataclass(frozen=True)
class GpuProgress:
    done: int
    total: int


@dataclass(frozen=True)
class GpuPreview:
    step: int
    images: list


@dataclass(frozen=True)
class GpuResults:
    results: list


@dataclass(frozen=True)
class GpuFailure:
    error: BaseException


GpuEvent = GpuProgress | GpuPreview | GpuResults | GpuFailure
GpuTask = Callable[..., Iterator[GpuEvent]]
# (the GPU function, its duration estimate) -> the function to call: in_process, or spaces.GPU on ZeroGPU
GpuWrap = Callable[[GpuTask, Callable[..., int]], GpuTask]


def in_process(task: GpuTask, duration: Callable[..., int]) -> GpuTask:
    """Run the GPU part in this process (everywhere but ZeroGPU); ``duration`` is not needed here."""
    return task


GPU_SECONDS_BASE = 20  # a worker's start (weights into GPU memory) and the VAE / SR stages
GPU_SECONDS_PER_STEP_512 = 0.1  # one image's denoising step at 512x512 with CFG, with room to spare
GPU_SECONDS_MAX = 120


def gpu_seconds(spec: DomainSpec, requests: list[GenerationRequest], previews: bool = False) -> int:
    """How long a GPU call may take (``spaces.GPU``'s ``duration``): ZeroGPU checks it against the
    visitor's quota before the call and queues shorter calls first, so it is estimated per call
    from the steps, images and size rather than fixed high."""
    work = sum(r.num_inference_steps * r.num_images * (r.height * r.width) / 512**2 for r in requests)
    return min(GPU_SECONDS_MAX, GPU_SECONDS_BASE + math.ceil(work * GPU_SECONDS_PER_STEP_512))


def portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (it crosses ZeroGPU's process boundary), else its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def follow(events: Iterator[GpuEvent], progress: Callable[[int, int], None], should_stop: Callable[[], bool],
           preview: PreviewCallback | None) -> list[GenerationResult]:
    """Hand the GPU function's events to the caller's callbacks; stop it (close) once ``should_stop``."""
    try:
        for event in events:
            if isinstance(event, GpuResults):
                return event.results
            if isinstance(event, GpuFailure):
                raise event.error
            if isinstance(event, GpuProgress):
                progress(event.done, event.total)
            elif preview is not None:
                preview(event.step, event.images)
            if should_stop():
                raise GenerationCancelled(say("stopped"))
    finally:
        events.close()
    raise GenerationCancelled(say("stopped"))  # closed from outside before a result


def release_gpu_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Availability:
    """What pressing Generate on a domain will do, said before it is pressed."""

    state: str
    usable: bool
    note: str = ""


class AppService:
    """What the faces can ask of the product; one instance per server (or CLI run)."""

    def __init__(self, registry: ModelRegistry | None = None, gate: GpuGate | None = None, gpu: GpuWrap = in_process):
        """``gpu`` wraps the GPU function: :func:`in_process`, or ``spaces.GPU`` on ZeroGPU (``serving.zerogpu``)."""
        self.registry = registry or default_registry()
        self.gate = gate or GpuGate.from_settings()
        self.finetune = FinetuneService(self.registry, JobManager())
        self.models = ModelsService(self.registry, self.gate, self.finetune)
        self._gpu_generate = gpu(self.generate_on_gpu, gpu_seconds)

    # ------------------------------------------------------------------ domains

    @property
    def domains(self) -> dict[str, DomainSpec]:
        return self.registry.domains

    def default_domain(self) -> str | None:
        """``demo`` if it works offline, else the first domain that does, else ``demo`` or the first one."""
        specs = self.domains
        ready = [d for d in specs.values() if self.state(d) in READY_STATES]
        if "demo" in specs and specs["demo"] in ready:
            return "demo"
        if ready:
            return ready[0].id
        return "demo" if "demo" in specs else next(iter(specs), None)

    def spec(self, domain_id: str | None) -> DomainSpec:
        """The domain named ``domain_id`` (the default one when empty); unknown -> 404."""
        domain_id = domain_id or self.default_domain()
        if domain_id is None:
            raise UserFacingError(404, say("no_domain"), "domain")
        try:
            return self.registry.spec(domain_id)
        except KeyError:
            known = ", ".join(self.domains)
            raise UserFacingError(404, say("unknown_domain", domain=domain_id, known=known), "domain") from None

    def state(self, spec: DomainSpec) -> str:
        return self.registry.state(spec)

    def availability(self, spec: DomainSpec) -> Availability:
        """Whether generation can work now, and what it will do first (download) or why not."""
        state = self.state(spec)
        if state == "missing":
            return Availability(state, False, say("model_missing"))
        if state in ("needs-download", "incomplete"):
            if settings().hub_offline:
                return Availability(state, False, say("offline_unavailable" if state == "needs-download" else "offline_incomplete"))
            return Availability(state, True, say("will_download", model=spec.model.name))
        return Availability(state, True)

    def model_spec(self, source: str) -> DomainSpec:
        """A domain for a model named directly (a diffusers folder or ``owner/name[@rev]``), at its native size."""
        try:
            spec = adhoc_spec(ModelSource.parse(source))
            side = native_size(self.registry.get(spec).pipe)
        except ValueError as exc:
            raise UserFacingError(422, str(exc), "model") from exc
        except ModelUnavailableError as exc:
            raise UserFacingError(503, str(exc), "model") from exc
        return replace(spec, height=side, width=side)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        request: GenerationRequest,
        domain: str | DomainSpec | None,
        *,
        optimization: str | None = None,
        progress: ProgressCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
        preview: PreviewCallback | None = None,
        field_names: Mapping[str, tuple[str, str]] | None = None,
    ) -> GenerationResult:
        """Validate (the core's rules), wait for a GPU slot, generate; errors become user-facing.

        ``field_names`` maps a request field to the (Chinese, English) name the caller's face
        shows for it (a widget label, a JSON key, a flag), so a refusal names what the user sees.

        ``domain`` is a domain id (empty: the default domain) or a spec from :meth:`model_spec`.
        ``optimization`` picks another level than the domain's: the registry keys loaded
        pipelines by level, so requests on the domain's own level are never disturbed.
        ``preview(step, images)`` gets live previews (see :mod:`rapid_diffusion.generation.preview`); such a request runs
        on its own rather than in a shared batch, whose previews would mix several users' images.
        """
        spec = domain if isinstance(domain, DomainSpec) else self.spec(domain)
        if optimization:
            spec = replace(spec, optimization=optimization)
        resolved = self.check(request, spec, field_names)
        try:
            return self._run_on_gpu(resolved, spec, progress, should_stop, preview)
        except QueueFullError as exc:
            raise UserFacingError(503, say("queue_full")) from exc
        except ModelUnavailableError as exc:
            raise UserFacingError(503, str(exc), "domain") from exc
        except torch.cuda.OutOfMemoryError as exc:
            release_gpu_memory()
            raise UserFacingError(503, say("out_of_memory")) from exc
        except GpuUnavailableError as exc:
            raise UserFacingError(503, say("gpu_unavailable", reason=str(exc))) from exc

    def check(self, request: GenerationRequest, domain: str | DomainSpec | None,
              field_names: Mapping[str, tuple[str, str]] | None = None) -> GenerationRequest:
        """``request`` resolved against the domain's rules (what :meth:`generate` runs); 422 naming the
        field as ``field_names`` says the face shows it. Lets a face check several requests before running any."""
        spec = domain if isinstance(domain, DomainSpec) else self.spec(domain)
        try:
            return request.resolve(spec)
        except RequestError as exc:
            name_zh, name_en = (field_names or {}).get(exc.field, (exc.field, exc.field))
            message = say("invalid_field", field_zh=name_zh, field_en=name_en, reason_zh=exc.reason_zh, reason_en=exc.reason)
            raise UserFacingError(422, message, name_en) from exc

    def _run_on_gpu(self, request, spec, progress, should_stop, preview) -> GenerationResult:
        """Through the GPU gate: concurrent same-shape requests of this domain share one UNet batch
        (a request with live previews runs alone: a shared batch's previews would mix users' images)."""

        def execute(requests, batch_progress, batch_should_stop):
            self.registry.get(spec)  # loaded (on ZeroGPU: moved to CUDA, i.e. registered) outside the GPU call
            events = self._gpu_generate(spec, requests, preview is not None)
            return follow(events, batch_progress, batch_should_stop, preview)

        key = None if preview is not None else (spec.id, self.registry.key_for(spec), batch_key(request))
        return self.gate.run(key, Member(request, progress, should_stop), execute)

    def generate_on_gpu(self, spec: DomainSpec, requests: list[GenerationRequest], previews: bool = False) -> Iterator[GpuEvent]:
        """The GPU part of a batch (``spaces.GPU``'s function on ZeroGPU): picklable in, picklable out.

        Yields :class:`GpuProgress` per denoising step, :class:`GpuPreview` when ``previews``, then
        :class:`GpuResults` (or :class:`GpuFailure`: errors travel as data, since ZeroGPU turns a raised
        one into a generic message). Closing the generator stops the denoising loop at its next step
        (on ZeroGPU ``spaces`` forwards the close to the worker).
        """
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        preview = (lambda step, images: events.put(GpuPreview(step, images))) if previews else None

        def work() -> None:
            progress = lambda done, total: events.put(GpuProgress(done, total))  # noqa: E731
            try:
                results = self.registry.get(spec).run(spec, requests, progress=progress, should_stop=stop.is_set, preview=preview)
                events.put(GpuResults(results))
            except BaseException as exc:  # handed to the caller as data
                if not isinstance(exc, (GenerationCancelled, ModelUnavailableError, torch.cuda.OutOfMemoryError)):
                    log.exception("generation failed for domain %s", spec.id)
                events.put(GpuFailure(portable(exc)))

        worker = threading.Thread(target=work, name=f"generate-{spec.id}", daemon=True)
        worker.start()
        try:
            while True:
                event = events.get()
                yield event
                if isinstance(event, (GpuResults, GpuFailure)):
                    return
        finally:
            stop.set()
            worker.join()

    def inspect_prompt(self, domain_id: str | None, prompt: str) -> PromptReport | None:
        """How ``prompt`` fits the domain's text encoder; ``None`` while its tokenizer is not on disk."""
        spec = self.spec(domain_id)
        try:
            tokenizer = self.registry.tokenizer(spec)
        except (OSError, ValueError) as exc:
            log.warning("no tokenizer for %s: %s", spec.id, exc)
            return None
        return None if tokenizer is None else inspect_prompt(tokenizer, prompt)

    # ------------------------------------------------------------------ models

    def preload(self, domain_ids: list[str]) -> list[str]:
        """Load these domains' models now, at start-up (ZeroGPU's pattern: models on CUDA before any
        GPU call); returns the ids loaded. A domain that cannot load is logged and skipped."""
        loaded = []
        for domain_id in domain_ids:
            try:
                self.registry.get(self.spec(domain_id))
            except (UserFacingError, ModelUnavailableError) as exc:
                log.error("domain %s was not preloaded: %s", domain_id, exc)
                continue
            loaded.append(domain_id)
        return loaded

    def compile_ahead_of_time(self, domain_ids: list[str], on_gpu: Callable) -> dict[str, str]:
        """ZeroGPU at start-up: the loaded domains whose level compiles (compile, openvino, auto)
        get their ahead-of-time path; ``on_gpu`` runs a task on the GPU. Returns each one's state."""
        from ..speed.levels import SLOW_LEVELS

        specs = [self.spec(domain_id) for domain_id in domain_ids]
        return {spec.id: self.registry.compile_ahead_of_time(spec, on_gpu).state for spec in specs if spec.optimization in SLOW_LEVELS}

    # ------------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        """Liveness (answering at all), readiness (which domains can serve without a download) and
        what each domain runs on (``acceleration``: eager / compiling / compiled / failed, and why)."""
        states = {spec.id: self.state(spec) for spec in self.domains.values()}
        ready = [d for d, state in states.items() if state in READY_STATES]
        loaded = [d for d, state in states.items() if state == "loaded"]
        acceleration = {spec.id: self.registry.acceleration(spec).as_dict() for spec in self.domains.values()}
        return {
            "status": "ok", "ready": bool(ready), "domains": states, "loaded": loaded,
            "acceleration": acceleration, "domain_errors": self.skipped_domain_files(),
        }

    def skipped_domain_files(self) -> list[dict[str, str]]:
        """The domain files skipped at the last load, as a stranger may see them."""
        return [self.describe_domain_error(e) for e in self.registry.domain_errors]

    @staticmethod
    def describe_domain_error(error) -> dict[str, str]:
        """A skipped domain file for a stranger's eyes: the file's name, never the server's path."""
        return {"file": Path(error.source).name, "field": error.field_name, "problem": error.problem}
