"""Warm-up never blocks a user: a compiling domain serves on its eager pipeline, then swaps the
optimised one in whole; failures stay eager with a reason; the torch.compile cache is keyed and
a corrupt one is ignored."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rapid_diffusion.generation import pipeline
from helpers import generate_one
from rapid_diffusion.generation.request import GenerationRequest
from rapid_diffusion.models.registry import ModelRegistry
from rapid_diffusion.speed import compile_cache, levels as optimize

from helpers import write_domain


@pytest.fixture()
def compiling_registry(test_domains, tiny_model_dir):
    write_domain(test_domains, "fast", tiny_model_dir, optimization="auto")
    return ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)


def slow_optimiser(started: threading.Event, seconds: float = 1.5):
    """Stands in for a compilation: marks the pipeline half-built for ``seconds``."""

    def apply(pipe, level, log, height=None, width=None, **kwargs):
        pipe.half_built = True
        started.set()
        time.sleep(seconds)
        log("compiled (test)")
        pipe.half_built = False
        pipe.optimised = True
        return "compile"

    return apply


def test_first_request_is_served_eagerly_and_the_swap_is_whole(compiling_registry, monkeypatch):
    started = threading.Event()
    monkeypatch.setattr(optimize, "apply_optimization", slow_optimiser(started))
    served = []
    original_run = pipeline.generate

    def recording_run(pipe, *args, **kwargs):
        served.append((getattr(pipe, "half_built", False), getattr(pipe, "optimised", False)))
        return original_run(pipe, *args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", recording_run)
    spec = compiling_registry.spec("fast")
    model = compiling_registry.get(spec)
    assert compiling_registry.acceleration(spec).state == "compiling"
    assert started.wait(30)
    results, errors = [], []

    def request(seed: int):
        try:
            results.append(generate_one(GenerationRequest(prompt="红色圆形", seed=seed, num_inference_steps=2), spec, registry=compiling_registry))
        except Exception as exc:  # the assertion below shows which
            errors.append(exc)

    threads = [threading.Thread(target=request, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join(60)
    compiling_registry.wait_for_warm_up()
    assert not errors and len(results) == 6
    assert not any(half_built for half_built, _ in served)
    assert served[0] == (False, False)  # the first request did not wait for the compilation
    acceleration = compiling_registry.acceleration(spec)
    assert (acceleration.state, acceleration.level, acceleration.applied) == ("compiled", "auto", "compile")
    assert model.pipe.optimised and model.optimization == "compile"
    generate_one(GenerationRequest(prompt="红色圆形", seed=0, num_inference_steps=2), spec, registry=compiling_registry)
    assert served[-1] == (False, True)


def test_failed_optimisation_stays_eager_and_says_why(compiling_registry, monkeypatch):
    def broken(pipe, level, log, **kwargs):
        log("OpenVINO failed (RuntimeError: no kernel); plain diffusers")
        return "none"

    monkeypatch.setattr(optimize, "apply_optimization", broken)
    spec = compiling_registry.spec("fast")
    eager = compiling_registry.get(spec).pipe
    compiling_registry.wait_for_warm_up()
    acceleration = compiling_registry.acceleration(spec)
    assert acceleration.state == "failed" and "no kernel" in acceleration.reason
    assert compiling_registry.get(spec).pipe is eager
    result = generate_one(GenerationRequest(prompt="红色圆形", seed=0, num_inference_steps=2), spec, registry=compiling_registry)
    assert len(result.images) == 1


def test_an_exception_in_the_optimiser_stays_eager(compiling_registry, monkeypatch):
    def exploding(pipe, level, log, **kwargs):
        raise MemoryError("out of host memory")

    monkeypatch.setattr(optimize, "apply_optimization", exploding)
    spec = compiling_registry.spec("fast")
    compiling_registry.get(spec)
    compiling_registry.wait_for_warm_up()
    assert compiling_registry.acceleration(spec).state == "failed"
    assert "MemoryError: out of host memory" in compiling_registry.acceleration(spec).reason


def test_without_background_warm_up_the_level_is_applied_at_load(compiling_registry, monkeypatch):
    monkeypatch.setattr(compiling_registry, "background_warmup", False)
    monkeypatch.setattr(optimize, "apply_optimization", slow_optimiser(threading.Event(), seconds=0))
    spec = compiling_registry.spec("fast")
    assert compiling_registry.get(spec).pipe.optimised
    assert compiling_registry.acceleration(spec).state == "compiled"


def test_a_domain_not_loaded_reports_eager(compiling_registry):
    acceleration = compiling_registry.acceleration(compiling_registry.spec("fast"))
    assert (acceleration.state, acceleration.reason) == ("eager", "not loaded")


def test_compile_cache_is_keyed_by_torch_weights_and_device(tiny_model_dir, monkeypatch, tmp_path):
    from rapid_diffusion.models.registry import load_pipeline

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path))
    pipe = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    sizes = [(64, 64)]
    key = compile_cache.compile_cache_file(pipe, sizes)
    assert key.parent == tmp_path / "cache" / "torch-compile"
    assert compile_cache.compile_cache_file(pipe, [(128, 128)]) != key
    real_description = compile_cache.device_description(torch.device("cpu"))  # AVX2, AVX512...: differ from it, whatever it is
    monkeypatch.setattr(compile_cache, "device_description", lambda device: real_description + "-another-isa")
    assert compile_cache.compile_cache_file(pipe, sizes) != key
    monkeypatch.setattr(torch, "__version__", "0.0-other")
    assert compile_cache.compile_cache_file(pipe, sizes) != key


def test_corrupt_compile_cache_is_ignored_with_a_log_line(tiny_model_dir, monkeypatch, tmp_path):
    from rapid_diffusion.models.registry import load_pipeline

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path))
    pipe = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    path = compile_cache.compile_cache_file(pipe, [(64, 64)])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a pickle at all")
    messages = []
    assert compile_cache.load_compile_artifacts(pipe, [(64, 64)], messages.append) == path
    assert len(messages) == 1 and messages[0].startswith(f"ignoring the corrupt torch.compile cache {path.name}")


def test_cache_writes_are_atomic(tmp_path):
    target = tmp_path / "entry.bin"
    compile_cache.write_atomically(target, b"abc")
    assert target.read_bytes() == b"abc" and [p.name for p in tmp_path.iterdir()] == ["entry.bin"]


def test_health_shows_what_each_domain_runs_on(compiling_registry, monkeypatch):
    from rapid_diffusion.service.app import AppService, GpuGate

    monkeypatch.setattr(optimize, "apply_optimization", slow_optimiser(threading.Event(), seconds=0))
    service = AppService(compiling_registry, GpuGate())
    assert service.health()["acceleration"]["fast"] == {"state": "eager", "level": "auto", "applied": "none", "reason": "not loaded"}
    service.load("fast")
    compiling_registry.wait_for_warm_up()
    assert service.health()["acceleration"]["fast"]["state"] == "compiled"
    assert service.health()["acceleration"]["tiny"]["level"] == "none"


def test_the_background_warm_up_setting_is_read_when_the_registry_is_made(monkeypatch):
    from rapid_diffusion.models.registry import ModelRegistry

    monkeypatch.setenv("RAPID_DIFFUSION_BACKGROUND_WARMUP", "0")
    assert ModelRegistry(domains={}).background_warmup is False
    assert ModelRegistry(domains={}, background_warmup=True).background_warmup is True
