"""Concurrent same-shape requests share a UNet batch; each image equals its unbatched self per
seed; cancellation and the queue bound still hold; a window of 0 turns batching off."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rapid_diffusion.generation import pipeline
from rapid_diffusion.service import app as service
from rapid_diffusion.service.batching import GpuGate, Member, QueueFullError
from rapid_diffusion.generation.pipeline import GenerationCancelled, generate
from rapid_diffusion.generation.request import GenerationRequest
from rapid_diffusion.service.app import AppService, UserFacingError


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def test_batched_images_equal_unbatched_ones_per_seed(registry):
    spec = registry.spec("tiny")
    pipe = registry.get(spec).pipe
    requests = [
        GenerationRequest(prompt="红色圆形", seed=5, num_images=2, num_inference_steps=3),
        GenerationRequest(prompt="蓝色正方形", negative_prompt="", seed=9, num_inference_steps=3),
    ]
    batched = generate(pipe, requests, spec=spec)
    for request, result in zip(requests, batched):
        [alone] = generate(pipe, [request], spec=spec)
        assert result.seeds == alone.seeds and result.settings["prompt"] == request.prompt
        for mine, reference in zip(pixels(result), pixels(alone)):
            assert np.abs(mine - reference).max() <= 1  # float rounding of a larger batch, at most one level


def test_a_batch_refuses_mixed_shapes(registry):
    spec = registry.spec("tiny")
    requests = [GenerationRequest(prompt="猫", seed=1, height=64), GenerationRequest(prompt="猫", seed=1, height=128)]
    with pytest.raises(ValueError, match="one size"):
        generate(registry.get(spec).pipe, requests, spec=spec)


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
    real = pipeline.generate

    def spy(pipe, requests, **kwargs):
        batches.append(len(requests))
        return real(pipe, requests, **kwargs)

    monkeypatch.setattr(pipeline, "generate", spy)
    requests = [GenerationRequest(prompt="红色圆形", seed=seed, num_inference_steps=2) for seed in (1, 2, 3)]
    results, errors = concurrently([lambda r=r: app.generate(r, "tiny") for r in requests])
    assert not errors and batches == [3]
    spec = registry.spec("tiny")
    for request, result in zip(requests, results):
        [alone] = generate(registry.get(spec).pipe, [request], spec=spec)
        assert np.abs(pixels(result)[0] - pixels(alone)[0]).max() <= 1


def test_window_zero_turns_batching_off(registry, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_BATCH_WINDOW_MS", "0")
    gate = GpuGate()
    assert gate.window_s == 0
    started, release = threading.Event(), threading.Event()
    batches = []

    def execute(requests, progress, should_stop):
        batches.append(len(requests))
        started.set()
        release.wait(10)
        return [r.seed for r in requests]

    calls = [lambda seed=seed: gate.run("same key", Member(GenerationRequest(prompt="猫", seed=seed)), execute) for seed in (1, 2)]
    threads = [threading.Thread(target=call) for call in calls]
    for thread in threads:
        thread.start()
    assert started.wait(10)
    release.set()
    for thread in threads:
        thread.join(10)
    assert batches == [1, 1]


class Recorder:
    """An ``execute`` that records what it computes and blocks until released."""

    def __init__(self):
        self.computed: list[int] = []
        self.running = threading.Event()
        self.release = threading.Event()

    def __call__(self, requests, progress, should_stop):
        self.running.set()
        self.computed.extend(r.seed for r in requests)
        assert self.release.wait(30)
        return [f"result {r.seed}" for r in requests]


def until(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def request(seed: int) -> GenerationRequest:
    return GenerationRequest(prompt="猫", seed=seed)


def test_a_burst_of_24_is_served_with_a_queue_of_16_and_the_25th_refused_before_anything_runs():
    """One batch of 8 runs (not waiting), 16 wait in two batches; the next request is refused at
    once and never computed."""
    gate = GpuGate(slots=1, max_waiting=16, window_s=30.0, max_images=8)
    recorder = Recorder()
    results, errors = {}, []

    def client(seed):
        try:
            results[seed] = gate.run("k", Member(request(seed)), recorder)
        except Exception as exc:  # collected for the assertions
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(24)]
    for thread in threads:
        thread.start()
    until(lambda: recorder.running.is_set() and gate.waiting == 16)
    start = time.monotonic()
    with pytest.raises(QueueFullError):
        gate.run("k", Member(request(99)), recorder)
    assert time.monotonic() - start < 1, "refused at once, not after waiting"
    recorder.release.set()
    for thread in threads:
        thread.join(30)
    assert not errors and sorted(results) == list(range(24))
    assert all(results[seed] == f"result {seed}" for seed in results)
    assert sorted(recorder.computed) == list(range(24)), "every admitted request computed once, the refused one never"
    assert gate.waiting == 0


def test_a_waiting_request_whose_client_leaves_is_not_computed():
    gate = GpuGate(slots=1, max_waiting=4, window_s=0.0)
    recorder = Recorder()
    first = threading.Thread(target=gate.run, args=("k", Member(request(1)), recorder))
    first.start()
    assert recorder.running.wait(10)
    left, outcome = threading.Event(), {}

    def impatient():
        try:
            gate.run("k", Member(request(2), should_stop=left.is_set), recorder)
        except GenerationCancelled:
            outcome["cancelled"] = True

    second = threading.Thread(target=impatient)
    second.start()
    until(lambda: gate.waiting == 1)
    left.set()
    second.join(5)
    assert outcome == {"cancelled": True} and gate.waiting == 0, "it left the queue while the GPU was busy"
    recorder.release.set()
    first.join(10)
    assert recorder.computed == [1]


def test_queued_batches_run_in_arrival_order_and_loads_queue_too():
    gate = GpuGate(slots=1, max_waiting=3, window_s=0.0)
    recorder = Recorder()
    order = []
    threads = [threading.Thread(target=gate.run, args=("k", Member(request(1)), recorder))]
    threads[0].start()
    assert recorder.running.wait(10)

    def load():
        with gate.slot():
            order.append("load")

    for index, target in enumerate([lambda: order.append(gate.run("k", Member(request(2)), recorder)), load,
                                     lambda: order.append(gate.run("k", Member(request(3)), recorder))]):
        threads.append(threading.Thread(target=target))
        threads[-1].start()
        until(lambda: gate.waiting == index + 1)
    with pytest.raises(QueueFullError):
        with gate.slot():
            pass
    recorder.release.set()
    for thread in threads:
        thread.join(10)
    assert order == ["result 2", "load", "result 3"]


def test_a_member_that_stops_is_cancelled_while_the_others_finish():
    started, release = threading.Event(), threading.Event()
    stop = threading.Event()

    def execute(requests, progress, should_stop):
        started.set()
        release.wait(10)
        assert not should_stop()  # one member still wants its images: the batch goes on
        return [f"result {r.seed}" for r in requests]

    gate = GpuGate(slots=1, window_s=0.2, max_images=8)
    outcome = {}

    def leader():
        outcome["leader"] = gate.run("k", Member(request(1)), execute)

    def follower():
        try:
            gate.run("k", Member(request(2), should_stop=stop.is_set), execute)
        except GenerationCancelled:
            outcome["follower"] = time.monotonic()

    threads = [threading.Thread(target=leader), threading.Thread(target=follower)]
    for thread in threads:
        thread.start()
    assert started.wait(10)
    stop.set()
    asked = time.monotonic()
    until(lambda: "follower" in outcome, seconds=5)
    assert outcome["follower"] - asked < 0.5  # not after the batch
    release.set()
    for thread in threads:
        thread.join(10)
    assert outcome["leader"] == "result 1"


def test_a_full_queue_is_a_503_through_the_service(registry, monkeypatch):
    gate = GpuGate(slots=1, max_waiting=0, window_s=0.0)
    app = AppService(registry, gate)
    with gate.slot():  # someone else is generating
        with pytest.raises(UserFacingError) as refused:
            app.generate(GenerationRequest(prompt="猫", seed=3, num_inference_steps=2), "tiny")
    assert refused.value.status == 503 and isinstance(refused.value.__cause__, QueueFullError)
