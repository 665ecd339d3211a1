"""ZeroGPU as Hugging Face documents it: one GPU function for every face, picklable at its edges,
models loaded before it, a duration per call, a no-op elsewhere.

Two levels: in this process, a stand-in for ``spaces.GPU`` that pickles everything crossing (what
ZeroGPU's worker boundary does) under the real UI handler, live previews and stop included; and a
server in a subprocess with the environment of a ZeroGPU Space and the real ``spaces`` package,
whose worker really forks (tests/zerogpu_host.py says what is stood in for: the device API and
the three CUDA steps). Not exercised here: a real GPU attached to the worker, the weights moved
to it, the quota.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from helpers import free_port, write_domain
from rapid_diffusion.domains import load_domains
from rapid_diffusion.generation.request import GenerationRequest
from rapid_diffusion.models.registry import ModelRegistry
from rapid_diffusion.service.app import AppService, GpuGate, GpuProgress, gpu_seconds
from rapid_diffusion.serving import zerogpu
from rapid_diffusion.serving.ui import UiContext, make_ui_generate

HERE = Path(__file__).resolve().parent


class PicklingBoundary:
    """A stand-in for ``spaces.GPU``: arguments are pickled in, every yielded value pickled out."""

    def __init__(self):
        self.calls: list[tuple[tuple, int]] = []
        self.events: list[str] = []

    def __call__(self, task, duration):
        def call(*args, **kwargs):
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
            self.calls.append((args, duration(*args, **kwargs)))
            for event in task(*args, **kwargs):
                self.events.append(type(event).__name__)
                yield pickle.loads(pickle.dumps(event))

        return call


@pytest.fixture()
def tiny_registry(tmp_path, tiny_model_dir, monkeypatch):
    folder = tmp_path / "domains"
    folder.mkdir()
    write_domain(folder, "tiny", tiny_model_dir, num_inference_steps=2)
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    return ModelRegistry(domains=load_domains([folder]), device=torch.device("cpu"), dtype=torch.float32)


def ui_values(**overrides):
    from types import SimpleNamespace

    values = dict(domain_id="tiny", prompt="一只橘猫", negative_prompt="", num_inference_steps=2.0, guidance_scale=5.0,
                  seed=7.0, num_images=1.0, sampler="pndm", size="64x64", super_resolution=False, optimization="none",
                  live_preview=False, request=SimpleNamespace(session_hash="s"))
    return {**values, **overrides}


def test_off_zerogpu_spaces_gpu_is_the_function_itself_and_the_server_runs_in_process(monkeypatch):
    import spaces

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def task():
        yield 1

    assert spaces.GPU(duration=5)(task) is task  # the real package, as documented: a no-op off ZeroGPU
    assert zerogpu.gpu_wrap() is zerogpu.in_process
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert zerogpu.gpu_wrap() is zerogpu.spaces_gpu


def test_the_ui_handler_crosses_the_boundary_pickled_with_progress_previews_and_stop(tiny_registry):
    boundary = PicklingBoundary()
    service = AppService(tiny_registry, GpuGate(1, 4), gpu=boundary)
    handler = make_ui_generate(UiContext(service))

    plain = list(handler(**ui_values(num_inference_steps=6.0)))[-1]
    streamed = list(handler(**ui_values(num_inference_steps=6.0, live_preview=True)))  # a preview every 5th step
    assert [len(boundary.calls), boundary.events.count("GpuResults")] == [2, 2]
    assert "GpuProgress" in boundary.events and "GpuPreview" in boundary.events  # previews crossed as data
    assert np.array_equal(np.asarray(open_png(plain[3][0])), np.asarray(open_png(streamed[-1][3][0])))
    (spec, requests, previews), seconds = boundary.calls[1]
    assert spec.id == "tiny" and previews is True and isinstance(requests[0], GenerationRequest)
    assert seconds == gpu_seconds(spec, requests)


def test_stopping_closes_the_gpu_function_which_stops_the_denoising_loop(tiny_registry, monkeypatch):
    """Closing the generator (what ``spaces`` forwards to its worker) ends the run at the next step."""
    from rapid_diffusion.models.registry import LoadedModel

    steps: list[int] = []
    real_run = LoadedModel.run

    def counting_run(self, spec, requests, *, progress, **kwargs):
        def counted(done, total):
            steps.append(done)
            progress(done, total)

        return real_run(self, spec, requests, progress=counted, **kwargs)

    monkeypatch.setattr(LoadedModel, "run", counting_run)
    service = AppService(tiny_registry, GpuGate(1, 4))
    spec = service.spec("tiny")
    request = GenerationRequest(prompt="猫", num_inference_steps=50, seed=1).resolve(spec)
    tiny_registry.get(spec)
    events = service.generate_on_gpu(spec, [request])
    first = next(events)
    assert isinstance(first, GpuProgress) and first.total == 50
    events.close()  # returns once the generation thread has ended
    assert not [t for t in threading.enumerate() if t.name == "generate-tiny"]
    assert max(steps) < 50  # stopped at a step boundary, not run to the end


def test_duration_grows_with_the_work_and_stays_within_bounds():
    spec = load_domains([Path(__file__).resolve().parent.parent / "rapid_diffusion" / "data" / "domains"])["food"]
    small = GenerationRequest(prompt="面", num_inference_steps=20, num_images=1).resolve(spec)
    large = GenerationRequest(prompt="面", num_inference_steps=50, num_images=4, height=768, width=768).resolve(spec)
    assert 20 < gpu_seconds(spec, [small]) < gpu_seconds(spec, [large]) <= 120


def open_png(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


# ----------------------------------------------------------------------------- the real spaces package


@contextmanager
def zerogpu_server(root: Path, model_dir: Path, gpu_uuid: str | None = None):
    """A server started as on a ZeroGPU Space (tests/zerogpu_host.py), with the tiny domain preloaded.
    Without ``gpu_uuid`` the CUDA steps are stood in for and the model stays on the CPU; with it
    (a CUDA machine) only the device API is, and the weights really move into the worker's GPU."""
    folder = root / "domains"
    folder.mkdir()
    write_domain(folder, "tiny", model_dir, num_inference_steps=2)
    port, api_port = free_port(), free_port()
    env = {**os.environ, "HOME": str(root), "RAPID_DIFFUSION_HOME": str(root / "rd-home"), "RAPID_DIFFUSION_DOMAINS": str(folder),
           "RAPID_DIFFUSION_PRELOAD": "tiny", "HF_HUB_OFFLINE": "1", "ZEROGPU_OFFLOAD_DIR": str(root / "offload"),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    if gpu_uuid is None:
        env["RAPID_DIFFUSION_DEVICE"] = "cpu"
    else:
        env["ZEROGPU_HOST_GPU_UUID"] = gpu_uuid
    log = open(root / "server.log", "w+")
    process = subprocess.Popen([sys.executable, str(HERE / "zerogpu_host.py"), str(port), str(api_port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # its group: server + GPU worker
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.time() > deadline:
            log.seek(0)
            raise RuntimeError(f"the ZeroGPU server did not start:\n{log.read()[-4000:]}")
        time.sleep(0.3)
    try:
        yield url, f"http://127.0.0.1:{api_port}", process.pid
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()


@pytest.fixture(scope="module")
def zerogpu_space(tmp_path_factory, tiny_model_dir):
    with zerogpu_server(tmp_path_factory.mktemp("zerogpu"), tiny_model_dir) as space:
        yield space


def device_api_calls(api_url: str) -> list[dict]:
    return httpx.get(api_url, timeout=10).json()


@pytest.mark.slow
def test_a_zerogpu_space_starts_with_its_models_loaded_and_reports_to_the_device_api(zerogpu_space):
    url, api_url, _ = zerogpu_space
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["loaded"] == ["tiny"]  # loaded at start, in the main process, before any GPU call
    assert [c["path"] for c in device_api_calls(api_url)][:1] == ["/startup-report"]


@pytest.mark.slow
def test_on_zerogpu_the_json_api_the_named_api_and_the_ui_event_run_in_the_forked_gpu_worker(zerogpu_space):
    from gradio_client import Client

    url, api_url, server_pid = zerogpu_space
    before = len(device_api_calls(api_url))
    response = httpx.post(f"{url}/api/predict/tiny", json={"text": "猫", "num_inference_steps": 2, "seed": 3}, timeout=120)
    assert response.status_code == 200, response.text
    client = Client(url, verbose=False, download_files=False)
    gallery, info = client.predict(prompt="猫", domain="tiny", seed=3, num_inference_steps=2, api_name="/generate")
    assert response.json()["seeds"] == info["seeds"] == [3] and len(gallery) == 1
    # The web UI's own Generate event (the page's button), live preview on: previews stream out of the worker.
    job = client.submit("tiny", "猫", "", 6, 5.0, 3, 1, "pndm", "64x64", False, "none", True, api_name="/generate_ui")
    updates = list(job)
    assert len(updates) >= 2 and job.status().success  # a preview (step 5 of 6), then the images
    assert [item["caption"] for item in job.result()[0]] == ["种子 seed 3"]

    calls = device_api_calls(api_url)[before:]
    assert [c["path"] for c in calls].count("/schedule") == 3  # one GPU call per request
    assert [c for c in calls if c["path"] == "/release"] and all(c.get("fail") == "false" for c in calls if c["path"] == "/release")
    allowed = {int(c["pid"]) for c in calls if c["path"] == "/allow"}
    assert allowed and server_pid not in allowed  # the work ran in the worker process spaces forked

    refused = httpx.post(f"{url}/api/predict/tiny", json={"text": "猫", "num_inference_steps": 0}, timeout=60)
    assert refused.status_code == 422 and refused.json()["field"] == "num_inference_steps"  # refused before any GPU call
    assert [c["path"] for c in device_api_calls(api_url)[before + len(calls):]].count("/schedule") == 0


def gpu_uuid() -> str | None:
    """The first GPU's UUID (what ZeroGPU's scheduler names the lent device by), or None without one."""
    if not torch.cuda.is_available():
        return None
    listing = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True, text=True)
    return listing.stdout.split()[0] if listing.returncode == 0 and listing.stdout.strip() else None


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(gpu_uuid() is None, reason="needs a CUDA device (and nvidia-smi): the weights really move into the ZeroGPU worker")
def test_on_a_gpu_the_weights_loaded_at_start_move_into_the_worker_and_generate(tmp_path, tiny_model_dir):
    """The whole ZeroGPU pattern but the platform: loaded at start on emulated CUDA, packed to disk,
    moved onto the real GPU inside the forked worker, generated there, images pickled back."""
    with zerogpu_server(tmp_path, tiny_model_dir, gpu_uuid()) as (url, api_url, server_pid):
        assert httpx.get(f"{url}/healthz", timeout=10).json()["loaded"] == ["tiny"]
        response = httpx.post(f"{url}/api/predict/tiny", json={"text": "猫", "num_inference_steps": 4, "seed": 3}, timeout=300)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["seeds"] == [3] and len(body["images_base64"]) == 1
        calls = device_api_calls(api_url)
        assert {int(c["pid"]) for c in calls if c["path"] == "/allow"} - {server_pid}
        assert all(c.get("fail") == "false" for c in calls if c["path"] == "/release")
