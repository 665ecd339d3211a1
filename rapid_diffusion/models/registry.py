"""Lazy, bounded cache of loaded pipelines: the project's only global mutable state.

A domain's pipeline is loaded on its first request (never at import or start-up), kept in
an LRU bounded by a model count and a memory budget, and loaded once even when several
first requests arrive together (one lock per model). Weights load only through safe paths:
safetensors, or ``.bin`` through ``torch.load(weights_only=True)`` (diffusers and
transformers both do so); no remote code, no custom pipelines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..speed.warmup import Acceleration, build_optimised, outcome, warmer_for
from ..domains import DomainSpec, ModelSource, domain_files_signature, load_domains
from ..errors import ModelUnavailableError
from ..generation import pipeline
from ..generation.pipeline import GenerationResult
from ..generation.request import GenerationRequest
from ..messages import MESSAGES, say
from .hub import (  # noqa: F401  (re-exported: callers import these from the registry)
    _progress_tqdm,
    cached_snapshot,
    choose_weight_files,
    download_snapshot,
    find_cached_snapshot,
    hub_offline,
    incomplete_message,
)
from ..settings import settings

log = logging.getLogger(__name__)


__all__ = ["Acceleration", "LoadedModel", "ModelRegistry", "ModelUnavailableError", "default_registry"]


@dataclass
class LoadedModel:
    key: str
    pipe: object
    device: torch.device
    dtype: torch.dtype
    nbytes: int
    load_seconds: float
    optimization: str = "none"
    acceleration: Acceleration = field(default_factory=lambda: Acceleration("eager", "none"))
    encode_prompt: Callable | None = None
    upscaler: Callable | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def run(self, spec: DomainSpec, requests: list[GenerationRequest], **callbacks) -> list[GenerationResult]:
        """:func:`~rapid_diffusion.generation.pipeline.generate` on this model, holding its lock (a
        pipeline runs one batch at a time); ``callbacks`` are that function's progress, stop and preview."""
        with self.lock:
            if self.pipe is None:
                raise ModelUnavailableError(say("model_just_unloaded", title=spec.title_zh, domain=spec.id))
            return pipeline.generate(self.pipe, requests, spec=spec, encode_prompt=self.encode_prompt, upscaler=self.upscaler, **callbacks)


def pick_device() -> tuple[torch.device, torch.dtype]:
    """``RAPID_DIFFUSION_DEVICE`` if set; else CUDA with fp16; else CPU with fp32."""
    name = settings().device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    return device, torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(folder: Path, device: torch.device, dtype: torch.dtype):
    """Load a diffusers Stable Diffusion folder with the PAI classes, safely."""
    from diffusers import StableDiffusionPipeline

    from safetensors import SafetensorError

    if not (folder / "model_index.json").is_file():
        log.error("%s is not a diffusers pipeline folder (no model_index.json)", folder)
        raise ModelUnavailableError(f"{folder.name} is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder,
            dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        # The exception text names files on the server: it goes to the log, the user gets its kind.
        log.error("could not load the pipeline in %s: %s", folder, exc)
        raise ModelUnavailableError(f"the model files of {folder.name} could not be loaded ({type(exc).__name__})") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def module_bytes(pipe) -> int:
    total = 0
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


class ModelRegistry:
    """Loads pipelines on first use and keeps the most recently used ones.

    ``max_models`` (``RAPID_DIFFUSION_MAX_MODELS``, default 2) and ``max_bytes``
    (``RAPID_DIFFUSION_MAX_MEMORY_GB``, default unbounded) bound what stays loaded.
    """

    def __init__(
        self,
        domains: dict[str, DomainSpec] | None = None,
        max_models: int | None = None,
        max_bytes: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        loader: Callable[[Path, torch.device, torch.dtype], object] = load_pipeline,
        progress: Callable[[str], None] | None = None,
        background_warmup: bool | None = None,
    ):
        self._domains = domains
        self._domains_from_disk = domains is None
        self._domains_signature: tuple | None = None
        self.background_warmup = settings().background_warmup if background_warmup is None else background_warmup
        self.max_models = max_models or settings().max_models
        self.max_bytes = max_bytes or settings().max_memory_bytes
        default_device, default_dtype = pick_device()
        self.device = device or default_device
        self.dtype = dtype or default_dtype
        self._loader = loader
        self.progress = progress or (lambda message: log.info(message))
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._key_locks: dict[str, threading.Lock] = {}
        self._tokenizers: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def domains(self) -> dict[str, DomainSpec]:
        """The domains as on disk now: re-read when a domain file was added, removed or changed, so
        a model a job has just finished is served by every face at once (a registry given fixed
        ``domains`` keeps them)."""
        if self._domains_from_disk:
            signature = domain_files_signature()
            if self._domains is None or signature != self._domains_signature:
                self._domains, self._domains_signature = load_domains(), signature
        return self._domains

    def reload_domains(self) -> dict[str, DomainSpec]:
        """Read the domain files again now (and from then on follow them)."""
        self._domains_from_disk, self._domains = True, None
        return self.domains

    @property
    def domain_errors(self) -> list:
        """The domain files skipped at the last load, each a ``DomainSpecError`` naming file and field."""
        return getattr(self.domains, "errors", [])

    def spec(self, domain_id: str) -> DomainSpec:
        try:
            return self.domains[domain_id]
        except KeyError:
            raise KeyError(f"unknown domain '{domain_id}'; known: {', '.join(self.domains)}") from None

    @staticmethod
    def key_for(spec: DomainSpec) -> str:
        """Cache key: the model source plus what the registry attaches to it at load
        (optimisation, SR weights, knowledge graph), so two domains sharing a model folder
        with different extras never share one loaded entry."""
        extras = [
            f"opt={spec.optimization}" if spec.optimization != "none" else "",
            f"sr={spec.sr_weights}" if spec.sr_weights else "",
            f"kg={spec.knowledge_graph}" if spec.knowledge_graph else "",
        ]
        return "|".join([spec.model.key, *[e for e in extras if e]])

    def get(self, spec: DomainSpec) -> LoadedModel:
        """The loaded model of ``spec``, loading it (once, even under concurrency) if needed."""
        key = self.key_for(spec)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = self._load(spec)
            with self._lock:
                self._models[key] = model
                evicted = self._evict(keep=key)
            for old in evicted:  # outside the registry lock: an evicted model's lock waits for its running generation
                self._release(old)
            if model.acceleration.state == "compiling":
                warmer_for(self.device).submit(lambda: build_optimised(model, self._optimiser(spec), self.progress))
            return model

    def _load(self, spec: DomainSpec) -> LoadedModel:
        folder = self.resolve_folder(spec)
        self.progress(f"loading domain '{spec.id}' from {spec.model.describe()} on {self.device}")
        start = time.perf_counter()
        pipe = self._loader(folder, self.device, self.dtype)
        acceleration = self._accelerate_now(pipe, spec)
        seconds = time.perf_counter() - start
        self.progress(f"loaded domain '{spec.id}' in {seconds:.1f}s")
        from ..upscaling.esrgan import upscaler_for

        upscaler = upscaler_for(spec, self.device, self.dtype, log=self.progress)
        from .conditioning import prompt_encoder_for

        encode_prompt = prompt_encoder_for(pipe)  # None unless the text encoder conditions in its own way
        if spec.knowledge_graph is not None:
            from ..knowledge import load_prompt_encoder

            encode_prompt = load_prompt_encoder(pipe, folder, spec.knowledge_graph, log=self.progress)
        return LoadedModel(
            self.key_for(spec), pipe, self.device, self.dtype, module_bytes(pipe), seconds, acceleration.applied,
            acceleration=acceleration, encode_prompt=encode_prompt, upscaler=upscaler,
        )

    def _accelerate_now(self, pipe, spec: DomainSpec) -> Acceleration:
        """Quick levels are applied here; slow ones (compile, openvino, auto) are left ``compiling``
        for the background warm-up, unless it is off (``RAPID_DIFFUSION_BACKGROUND_WARMUP=0``, or a
        one-shot command that would otherwise wait for it at exit)."""
        from ..speed.levels import SLOW_LEVELS

        if spec.optimization == "none":
            return Acceleration("eager", "none")
        if spec.optimization in SLOW_LEVELS and settings().zero_gpu:
            # ZeroGPU attaches a GPU only inside a spaces.GPU call: nothing may compile at load or in a
            # background thread; the domains loaded at start-up are compiled ahead of time there.
            return Acceleration("eager", spec.optimization, reason="ZeroGPU: compiled ahead of time at start-up only")
        if spec.optimization in SLOW_LEVELS and self.background_warmup:
            return Acceleration("compiling", spec.optimization)
        messages: list[str] = []

        def record(message: str) -> None:
            messages.append(message)
            self.progress(message)

        return outcome(spec.optimization, self._optimiser(spec)(pipe, record), messages)

    @staticmethod
    def _optimiser(spec: DomainSpec) -> Callable[[object, Callable[[str], None]], str]:
        def optimise(pipe, log_line: Callable[[str], None]) -> str:
            from ..speed.levels import apply_optimization

            return apply_optimization(pipe, spec.optimization, log=log_line, height=spec.height, width=spec.width)

        return optimise

    def compile_ahead_of_time(self, spec: DomainSpec, on_gpu: Callable) -> Acceleration:
        """ZeroGPU at start-up: ``spec``'s UNet compiled ahead of time under its model lock
        (:func:`rapid_diffusion.speed.ahead_of_time.compile_ahead_of_time`; ``on_gpu`` runs a task on the GPU)."""
        from ..speed.ahead_of_time import compile_ahead_of_time

        model = self.get(spec)
        with model.lock:
            model.acceleration = compile_ahead_of_time(model.pipe, spec.optimization, on_gpu, self.progress,
                                                       height=spec.height, width=spec.width)
            model.optimization = model.acceleration.applied
        return model.acceleration

    def acceleration(self, spec: DomainSpec) -> Acceleration:
        """What ``spec``'s requests run on now (``eager`` with reason "not loaded" before its first use)."""
        model = self._models.get(self.key_for(spec))
        if model is None:
            return Acceleration("eager", spec.optimization, reason="not loaded")
        return model.acceleration

    def wait_for_warm_up(self) -> None:
        """Block until this registry's device has no background warm-up left (tests, benchmarks)."""
        warmer_for(self.device).wait()

    def resolve_folder(self, spec: DomainSpec) -> Path:
        """The local folder of a domain's model, downloading it if allowed; else a clear error."""
        source = spec.model
        if source.is_local:
            if not (source.path / "model_index.json").is_file():
                log.error("domain '%s': model folder %s is missing or has no model_index.json", spec.id, source.path)
                raise ModelUnavailableError(say("model_files_missing", title=spec.title_zh, domain=spec.id, model=source.name,
                                                **self._offline_hint()))
            return source.path
        reason = "HF_HUB_OFFLINE is set"
        if not hub_offline():
            try:
                self.progress(f"checking {source.describe()} for domain '{spec.id}' against the hub")
                return download_snapshot(source, self.progress)
            except Exception as exc:  # network errors come in many classes (httpx, hub); the cache may still do
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("domain '%s': hub check failed (%s); trying the local cache", spec.id, reason)
        snapshot = cached_snapshot(source)
        if snapshot.complete:
            return snapshot.folder
        if snapshot.folder is not None:
            log.warning("domain '%s': cached snapshot incomplete (%s)", spec.id, reason)
            raise ModelUnavailableError(incomplete_message(source, snapshot.missing))
        raise self._unreachable(spec, reason)

    def _unreachable(self, spec: DomainSpec, reason: str) -> ModelUnavailableError:
        """Not downloaded and no hub: the user is told what works instead; why the hub failed goes to the log."""
        log.warning("domain '%s': %s is not cached and the hub cannot be reached (%s)", spec.id, spec.model.describe(), reason)
        return ModelUnavailableError(say("model_not_downloaded", title=spec.title_zh, domain=spec.id, model=spec.model.name,
                                         **self._offline_hint()))

    def _offline_hint(self) -> dict[str, str]:
        """The domains that work without the hub, as the two halves of a sentence."""
        ready = [d.title_zh for d in self.domains.values() if self.state(d) in ("loaded", "offline-ready", "cached")]
        ready_ids = [d.id for d in self.domains.values() if self.state(d) in ("loaded", "offline-ready", "cached")]
        if not ready:
            zh, en = MESSAGES["no_offline_domain"]
            return {"offline_zh": zh, "offline_en": en}
        zh, en = MESSAGES["offline_domains"]
        return {"offline_zh": zh.format(domains="、".join(ready)), "offline_en": en.format(domains=", ".join(ready_ids))}

    def state(self, spec: DomainSpec) -> str:
        """``loaded``, ``offline-ready`` (local files), ``cached`` (complete in the hub cache),
        ``incomplete`` (a download cut short) or ``needs-download``."""
        if self.key_for(spec) in self._models:
            return "loaded"
        if spec.model.is_local:
            return "offline-ready" if (spec.model.path / "model_index.json").is_file() else "missing"
        return cached_snapshot(spec.model).state

    def tokenizer(self, spec: DomainSpec):
        """The domain's tokenizer without loading (or downloading) its model; ``None`` if not on disk.

        A loaded model's own tokenizer is taken under the registry's lock (never waiting for a
        generation that holds the model's lock); otherwise the tokenizer folder is read once and
        kept (it is small), keyed like the models.
        """
        key = self.key_for(spec)
        with self._lock:
            model = self._models.get(key)
            pipe = model.pipe if model is not None else None
            cached = self._tokenizers.get(key)
        if pipe is not None:
            return pipe.tokenizer
        if cached is not None:
            return cached
        folder = spec.model.path if spec.model.is_local else find_cached_snapshot(spec.model)
        if folder is None or not (folder / "tokenizer").is_dir():
            return None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        with self._lock:
            return self._tokenizers.setdefault(key, tokenizer)

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def unload(self, key: str) -> bool:
        with self._lock:
            model = self._models.pop(key, None)
        if model is None:
            return False
        self._release(model)
        return True

    def _evict(self, keep: str) -> list[LoadedModel]:
        """Drop least recently used models until the count and memory budgets hold; returns them
        for the caller to release once it has let go of the registry lock."""
        evicted = []
        while len(self._models) > 1 and (
            len(self._models) > self.max_models
            or (self.max_bytes is not None and sum(m.nbytes for m in self._models.values()) > self.max_bytes)
        ):
            oldest_key = next(k for k in self._models if k != keep)
            model = self._models.pop(oldest_key)
            log.info("evicting %s from the model cache", oldest_key)
            evicted.append(model)
        return evicted

    @staticmethod
    def _release(model: LoadedModel) -> None:
        with model.lock:
            model.pipe = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def adhoc_spec(source: ModelSource, height: int = 512, width: int = 512) -> DomainSpec:
    """A domain spec for a model given on the command line (``--model``), with SD defaults."""
    name = source.path.name if source.is_local else source.repo_id.split("/")[-1]
    return DomainSpec(
        id="custom",
        title_zh=f"自定义模型 {name}",
        title_en=f"Custom model {name}",
        description=f"Model given directly: {source.describe()}",
        model=source,
        examples=("一只猫", "一幅山水画", "一碗面条"),
        height=height,
        width=width,
    )


def native_size(pipe) -> int:
    """The image side a pipeline was trained at (UNet sample size x VAE scale factor)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


_default_registry: ModelRegistry | None = None
_default_lock = threading.Lock()


def default_registry() -> ModelRegistry:
    """The process-wide registry (created on first call, loads nothing by itself)."""
    global _default_registry
    with _default_lock:
        if _default_registry is None:
            _default_registry = ModelRegistry()
        return _default_registry
