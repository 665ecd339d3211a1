"""Serving benchmarks: throughput and latency through the service layer (``--concurrency``),
and steady latency through the JSON API of a running server (``--api``).

Both need the faces' layer (the service, a server), so they live above it, apart from
:mod:`rapid_diffusion_dev.bench.speed`, which times pipelines directly.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from rapid_diffusion.generation.request import GenerationRequest
from rapid_diffusion.settings import settings

from .speed import machine_info, spread

PROMPTS = ("左边有一个大的红色圆形", "中间有一个蓝色的正方形", "上面有一个小的黄色三角形", "右边是一个绿色的星形")


def run_concurrency(domain: str, level: str, clients: int, per_client: int, log: Callable[[str], None] = print) -> dict:
    """``clients`` threads each send ``per_client`` one-image requests through :class:`AppService`,
    with batching off and on (``RAPID_DIFFUSION_BATCH_WINDOW_MS``, 30 ms if it is 0)."""
    from rapid_diffusion.domains import load_domains
    from rapid_diffusion.models.registry import ModelRegistry
    from rapid_diffusion.service.app import AppService, GpuGate

    spec = replace(load_domains()[domain], optimization=level)
    registry = ModelRegistry(domains={domain: spec}, max_models=1)
    registry.get(spec)
    registry.wait_for_warm_up()
    log(f"{domain}: {registry.acceleration(spec)}")
    window_s = (settings().batch_window_ms or 30.0) / 1000
    modes = {}
    for label, window in (("batching off", 0.0), (f"batching {window_s * 1000:.0f} ms", window_s)):
        app = AppService(registry, GpuGate(slots=1, max_waiting=clients * per_client, window_s=window))
        app.generate(GenerationRequest(prompt=PROMPTS[0], seed=0), domain)
        modes[label] = timed_clients(app, domain, clients, per_client)
        log(f"{label}: {modes[label]['images_per_s']:.2f} images/s, p50 {modes[label]['latency_s']['p50']:.3f}s")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device("cpu")),
        "domain": domain,
        "level": level,
        "applied": registry.acceleration(spec).applied,
        "clients": clients,
        "requests_per_client": per_client,
        "modes": modes,
    }


def timed_clients(app, domain: str, clients: int, per_client: int) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(per_client):
            request = GenerationRequest(prompt=PROMPTS[(index + k) % len(PROMPTS)], seed=index * 1000 + k)
            start = time.perf_counter()
            app.generate(request, domain)
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "images_per_s": len(latencies) / wall, "latency_s": percentiles(latencies)}


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50": pick(0.5), "p95": pick(0.95), "mean": statistics.fmean(ordered), "n": len(ordered)}


def concurrency_table(result: dict) -> str:
    rows = ["| mode | images/s | p50 s | p95 s | requests |", "|---|---|---|---|---|"]
    for label, entry in result["modes"].items():
        latency = entry["latency_s"]
        rows.append(f"| {label} | {entry['images_per_s']:.2f} | {latency['p50']:.3f} | {latency['p95']:.3f} | {latency['n']} |")
    return "\n".join(rows)


def run_api_latency(domain: str, runs: int, port: int = 7871, log: Callable[[str], None] = print, timeout_s: float = 900) -> dict:
    """Start ``rapid-diffusion serve`` with ``domain`` as shipped and a copy of it at ``optimization:
    none`` (``<domain>-plain``); once ``/healthz`` says the domain is no longer compiling, time
    ``runs`` interleaved JSON requests to each (after one untimed request each)."""
    with tempfile.TemporaryDirectory() as folder:
        plain_id = write_plain_copy(domain, Path(folder))
        env = {**os.environ, "RAPID_DIFFUSION_DOMAINS": folder, "PORT": str(port)}
        server = subprocess.Popen([sys.executable, "-m", "rapid_diffusion", "serve", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: get_json(f"{base}/healthz"), timeout_s)
            started = time.perf_counter()
            first = post_predict(base, domain, 0)
            log(f"first request to '{domain}' answered in {first:.2f}s while it compiles")
            acceleration = wait_for(lambda: compiled_state(base, domain), timeout_s)
            warmed = time.perf_counter() - started
            times = {domain: [], plain_id: []}
            for name in times:
                post_predict(base, name, 1)
            for run in range(runs):
                for name in times:
                    times[name].append(post_predict(base, name, run + 2))
            counts = image_counts(base, domain, runs)
        finally:
            server.terminate()
            server.wait(30)
    accelerated, plain = (statistics.median(times[name]) for name in (domain, plain_id))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device("cpu")),
        "domain": domain,
        "acceleration": acceleration,
        "first_request_while_compiling_s": first,
        "warm_up_done_after_s": warmed,
        "latency_s": {domain: spread(times[domain]), plain_id: spread(times[plain_id])},
        "plain_over_accelerated": plain / accelerated,
        "image_counts": counts,
    }


def image_counts(base: str, domain: str, runs: int, counts: tuple[int, ...] = (1, 2, 3, 4)) -> list[dict]:
    """For each images-per-request count, in order: the first request of that count (any shape the
    warm-up missed would compile now) and the median of ``runs`` more; a stall shows as a high ratio."""
    rows = []
    for count in counts:
        first = post_predict(base, domain, 100 + count, count)
        steady = statistics.median(post_predict(base, domain, 200 + count * runs + run, count) for run in range(runs))
        rows.append({"images": count, "first_s": first, "steady_s": steady, "first_over_steady": first / steady})
    return rows


LOAD_CLIENTS = (1, 8, 16, 24, 64)


def run_load(domain: str, clients: tuple[int, ...] = LOAD_CLIENTS, port: int = 7872, log: Callable[[str], None] = print,
             timeout_s: float = 900) -> dict:
    """Start ``rapid-diffusion serve`` with its default settings; for each count in ``clients``, that
    many clients send one JSON request at the same instant. Per count: served (200), refused (503),
    anything else, and the latency of each kind (p50, p95), so a refusal is seen to come at once."""
    env = {**os.environ, "PORT": str(port)}
    server = subprocess.Popen([sys.executable, "-m", "rapid_diffusion", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_for(lambda: get_json(f"{base}/healthz"), timeout_s)
        post_predict(base, domain, 0)
        wait_for(lambda: compiled_state(base, domain), timeout_s)
        for count in clients:
            rows.append({"clients": count, **burst(base, domain, count)})
            log(load_row(rows[-1]))
    finally:
        server.terminate()
        server.wait(30)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device("cpu")),
        "domain": domain,
        "settings": {"queue_size": settings().queue_size, "batch_window_ms": settings().batch_window_ms,
                     "max_images": settings().max_images},
        "rows": rows,
    }


def burst(base: str, domain: str, count: int) -> dict:
    """``count`` one-image requests released together; status codes and latencies by outcome."""
    outcomes: list[tuple[int, float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(count)

    def client(index: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            post_predict(base, domain, index)
            status = 200
        except urllib.error.HTTPError as exc:
            status = exc.code
        with lock:
            outcomes.append((status, time.perf_counter() - start))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    by_status = lambda wanted: [t for status, t in outcomes if wanted(status)]  # noqa: E731
    served, refused, other = by_status(lambda s: s == 200), by_status(lambda s: s == 503), by_status(lambda s: s not in (200, 503))
    return {"served": len(served), "refused": len(refused), "other": len(other),
            "served_s": percentiles(served) if served else None, "refused_s": percentiles(refused) if refused else None}


def load_row(row: dict) -> str:
    served, refused = row["served_s"], row["refused_s"]
    latency = f"p50 {served['p50']:.2f}s p95 {served['p95']:.2f}s" if served else "-"
    refusal = f"refused in p95 {refused['p95'] * 1000:.0f} ms" if refused else ""
    return f"{row['clients']:>3} clients: {row['served']} served ({latency}), {row['refused']} refused {refusal}, {row['other']} other"


def load_table(result: dict) -> str:
    rows = ["| clients | served | refused (503) | other | served p50 s | served p95 s | 503 p95 ms |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        served, refused = row["served_s"] or {}, row["refused_s"] or {}
        rows.append(
            f"| {row['clients']} | {row['served']} | {row['refused']} | {row['other']} | {served.get('p50', float('nan')):.2f} | "
            f"{served.get('p95', float('nan')):.2f} | {refused.get('p95', float('nan')) * 1000:.0f} |"
        )
    return "\n".join(rows)


def write_plain_copy(domain: str, folder: Path) -> str:
    """A domain file like ``domain``'s, at ``optimization: none``, with an absolute model path."""
    from rapid_diffusion.domains import load_domains

    spec = load_domains()[domain]
    source = spec.model
    model = f"  path: {source.path}" if source.is_local else f"  repo_id: {source.repo_id}\n  revision: {source.revision}"
    plain_id = f"{domain}-plain"
    lines = [
        f"id: {plain_id}", "title:", f"  zh: {spec.title_zh}（未加速）", f"  en: {spec.title_en} (plain)",
        "description: the same model without acceleration, for the benchmark", "model:", model,
        f"height: {spec.height}", f"width: {spec.width}", f"num_inference_steps: {spec.num_inference_steps}",
        f"guidance_scale: {spec.guidance_scale}", f"sampler: {spec.sampler}", "optimization: none",
        "examples:", *[f"  - {e}" for e in spec.examples],
    ]
    (folder / f"{plain_id}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return plain_id


def compiled_state(base: str, domain: str) -> dict | None:
    acceleration = get_json(f"{base}/healthz")["acceleration"][domain]
    return acceleration if acceleration["state"] != "compiling" else None


def post_predict(base: str, domain: str, seed: int, num_images: int = 1) -> float:
    body = json.dumps({"text": PROMPTS[seed % len(PROMPTS)], "seed": seed, "num_images": num_images}).encode()
    request = urllib.request.Request(f"{base}/api/predict/{domain}", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        json.loads(response.read())
    return time.perf_counter() - start


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def wait_for(probe: Callable, timeout_s: float, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = probe()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing after {timeout_s:.0f}s")
        time.sleep(interval_s)
