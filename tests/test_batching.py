"""Concurrent same-shape requests share a UNet batch; each image equals its unbatched self per
seed; cancellation and the queue bound still hold; a window of 0 turns batching off."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rapid_diffusion.generation import pipeline
from rapid_diffusion.service import app as service
from rapid_diffusion.service.batching import Batcher, Member
from rapid_diffusion.generation.pipeline import GenerationCancelled, run_batch, run_pipeline
from rapid_diffusion.generation.request import GenerationRequest
from rapid_diffusion.service.app import AppService, GpuGate, QueueFullError, UserFacingError


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def test_batched_images_equal_unbatched_ones_per_seed(registry):
    spec = registry.spec("tiny")
    pipe = registry.get(spec).pipe
    requests = [
        GenerationRequest(prompt="红色圆形", seed=5, num_images=2, num_inference_steps=3),
        GenerationRequest(prompt="蓝色正方形", negative_prompt="", seed=9, num_inference_steps=3),
    ]
    batched = run_batch(pipe, requests, spec=spec)
    for request, result in zip(requests, batched):
        alone = run_pipeline(pipe, request, spec=spec)
        assert result.seeds == alone.seeds and result.settings["prompt"] == request.prompt
        for mine, reference in zip(pixels(result), pixels(alone)):
            assert np.abs(mine - reference).max() <= 1  # float rounding of a larger batch, at most one level


def test_a_batch_refuses_mixed_shapes(registry):
    spec = registry.spec("tiny")
    requests = [GenerationRequest(prompt="猫", seed=1, height=64), GenerationRequest(prompt="猫", seed=1, height=128)]
    with pytest.raises(ValueError, match="one size"):
        run_batch(registry.get(spec).pipe, requests, spec=spec)


def concurrently(calls) -> tuple[list, list]:
    results, errors = [None] * len(calls), []

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # collected for the assertions
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results, errors


def test_service_batches_concurrent_requests(registry, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_BATCH_WINDOW_MS", "300")
    app = AppService(registry, GpuGate())
    batches = []
    real = pipeline.generate_batch

    def spy(requests, *args, **kwargs):
        batches.append(len(requests))
        return real(requests, *args, **kwargs)

    monkeypatch.setattr(service, "generate_batch", spy)
    requests = [GenerationRequest(prompt="红色圆形", seed=seed, num_inference_steps=2) for seed in (1, 2, 3)]
    results, errors = concurrently([lambda r=r: app.generate(r, "tiny") for r in requests])
    assert not errors and batches == [3]
    spec = registry.spec("tiny")
    for request, result in zip(requests, results):
        alone = run_pipeline(registry.get(spec).pipe, request, spec=spec)
        assert np.abs(pixels(result)[0] - pixels(alone)[0]).max() <= 1


def test_window_zero_turns_batching_off(registry, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_BATCH_WINDOW_MS", "0")
    assert AppService(registry, GpuGate()).batcher is None


def test_a_member_that_stops_is_cancelled_while_the_others_finish():
    started, release = threading.Event(), threading.Event()
    stop = threading.Event()

    def execute(requests, progress, should_stop):
        started.set()
        release.wait(10)
        assert not should_stop()  # one member still wants its images: the batch goes on
        return [f"result {r.seed}" for r in requests]

    batcher = Batcher(window_s=0.2, max_images=8)
    request = lambda seed: GenerationRequest(prompt="猫", seed=seed)  # noqa: E731
    nowhere = lambda: threading.Lock()  # noqa: E731  (a context manager that never refuses)
    outcome = {}

    def leader():
        outcome["leader"] = batcher.run("k", Member(request(1)), execute, nowhere)

    def follower():
        try:
            batcher.run("k", Member(request(2), should_stop=stop.is_set), execute, nowhere)
        except GenerationCancelled:
            outcome["follower"] = time.monotonic()

    threads = [threading.Thread(target=leader), threading.Thread(target=follower)]
    for thread in threads:
        thread.start()
    assert started.wait(10)
    stop.set()
    asked = time.monotonic()
    time.sleep(0.5)
    assert "follower" in outcome and outcome["follower"] - asked < 0.5  # not after the batch
    release.set()
    for thread in threads:
        thread.join(10)
    assert outcome["leader"] == "result 1"


def test_waiting_members_count_against_the_queue_bound(registry, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_BATCH_WINDOW_MS", "200")
    gate = GpuGate(slots=1, max_waiting=1)
    app = AppService(registry, gate)
    running, release = threading.Event(), threading.Event()
    real = service.generate

    def slow_generate(*args, **kwargs):
        running.set()
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "generate", slow_generate)
    first = threading.Thread(target=app.generate, args=(GenerationRequest(prompt="猫", seed=1, num_inference_steps=1), "tiny"))
    first.start()
    assert running.wait(20)  # holds the only slot
    waiting = threading.Thread(target=app.generate, args=(GenerationRequest(prompt="猫", seed=2, num_inference_steps=1), "tiny"))
    waiting.start()  # a new group: waits for the slot, filling the queue
    time.sleep(0.6)
    with pytest.raises(UserFacingError) as refused:
        app.generate(GenerationRequest(prompt="猫", seed=3, num_inference_steps=2), "tiny")
    assert refused.value.status == 503 and isinstance(refused.value.__cause__, QueueFullError)
    release.set()
    first.join(30)
    waiting.join(30)
