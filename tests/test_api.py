"""The PAI-EAS-compatible JSON endpoint and the GPU gate it shares with the UI."""

import base64
import io
import logging
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from rapid_diffusion.service import app as service
from rapid_diffusion.serving.api import MAX_BODY_BYTES, create_api_app
from rapid_diffusion.service.app import AppService, GpuGate, QueueFullError
from rapid_diffusion.domains import load_domains
from rapid_diffusion.generation.pipeline import read_png_settings
from rapid_diffusion.generation.request import RequestError
from rapid_diffusion.models.registry import ModelRegistry

from helpers import write_domain


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("api-domains")
    write_domain(folder, "tiny", tiny_model_dir, num_inference_steps=2)
    write_domain(folder, "broken", tmp_path_factory.mktemp("no-model"))
    return ModelRegistry(domains=load_domains([folder]), device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def client(registry):
    with TestClient(create_api_app(AppService(registry, GpuGate(1, 4)))) as test_client:
        yield test_client


def predict(client, body, domain="tiny"):
    return client.post(f"/api/predict/{domain}", json=body)


def test_predict_returns_png_images_with_seeds_and_embedded_settings(client):
    body = {"text": "一只橘猫在窗台上", "num_inference_steps": 2, "num_images": 2, "seed": 7}
    response = predict(client, body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["text"] == body["text"]
    assert data["seeds"] == [7, 8]
    assert len(data["images_base64"]) == 2
    png = base64.b64decode(data["images_base64"][1])
    assert png.startswith(b"\x89PNG")
    settings = read_png_settings(png)
    assert (settings["seed"], settings["num_inference_steps"], settings["domain"]) == (8, 2, "tiny")
    alone = predict(client, {**body, "num_images": 1, "seed": 8}).json()
    assert np.abs(pixels(alone["images_base64"][0]) - pixels(data["images_base64"][1])).max() <= 1


def pixels(image_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_base64))), dtype=np.int16)


def test_omitted_fields_take_the_domain_defaults(client):
    data = predict(client, {"text": "蓝色正方形", "seed": 1}).json()
    settings = read_png_settings(base64.b64decode(data["images_base64"][0]))
    assert (settings["num_inference_steps"], settings["guidance_scale"], settings["negative_prompt"]) == (2, 5.0, "模糊")
    assert len(data["images_base64"]) == 1


def test_malformed_json_is_400(client):
    response = client.post("/api/predict/tiny", content='{"text": "猫"'.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]
    assert client.post("/api/predict/tiny", json=["猫"]).status_code == 400


@pytest.mark.parametrize(
    "body, field",
    [
        ({"text": 5}, "text"),
        ({"text": "猫", "num_inference_steps": "20"}, "num_inference_steps"),
        ({"text": "猫", "num_images": True}, "num_images"),
        ({"text": "猫", "guidance_scale": "high"}, "guidance_scale"),
        ({"text": "猫", "super_resolution": "yes"}, "super_resolution"),
        ({"text": "猫", "steps": 20}, "steps"),
        ({"num_images": 1}, "text"),
        ({"prompt": "猫"}, "prompt"),
    ],
)
def test_wrong_types_missing_and_unknown_fields_name_the_field(client, body, field):
    response = predict(client, body)
    assert response.status_code == 422
    assert response.json()["field"] == field


@pytest.mark.parametrize(
    "body, field",
    [
        ({"text": "猫", "num_inference_steps": 0}, "num_inference_steps"),
        ({"text": "猫", "num_images": 100}, "num_images"),
        ({"text": "猫", "guidance_scale": -1}, "guidance_scale"),
        ({"text": "猫", "seed": -5}, "seed"),
        ({"text": "   "}, "text"),
        ({"text": "猫" * 1001}, "text"),
    ],
)
def test_out_of_range_and_too_long_are_rejected_by_the_core_rules(client, body, field):
    response = predict(client, body)
    assert response.status_code == 422
    error = response.json()
    assert error["field"] == field
    assert f"Invalid {field}:" in error["error"], "the message names the field as the client sent it"


def test_invalid_input_is_rejected_before_any_model_is_loaded(client, registry):
    response = predict(client, {"text": "猫", "num_inference_steps": 0}, domain="broken")
    assert response.status_code == 422
    assert "broken" not in [m.key for m in registry.loaded()]


def test_unknown_domain_is_404_and_unloadable_model_503(client):
    response = predict(client, {"text": "猫"}, domain="nope")
    assert response.status_code == 404
    assert response.json()["field"] == "domain"
    assert "tiny" in response.json()["error"]
    response = predict(client, {"text": "猫"}, domain="broken")
    assert response.status_code == 503
    assert "missing" in response.json()["error"] and "模型文件缺失" in response.json()["error"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"text": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        b'{"text": "cat", "seed": ' + b"9" * 5_000 + b"}",
        b'{"text": "\xff"}',
    ],
    ids=["20000-deep", "5000-digit-int", "bad-utf8"],
)
def test_pathological_json_is_400_not_500(client, raw, caplog):
    caplog.set_level(logging.INFO, "rapid_diffusion")
    response = client.post("/api/predict/tiny", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["field"] is None and "JSON" in response.json()["error"]
    rejections = [r for r in caplog.records if r.name == "rapid_diffusion.serving.api"]
    assert len(rejections) == 1 and rejections[0].exc_info is None, "one log line, no traceback"


def test_zero_byte_safetensors_is_503_without_server_paths(copy_model, tmp_path):
    model = copy_model("empty-weights")
    (model / "text_encoder" / "model.safetensors").write_bytes(b"")
    folder = tmp_path / "domains"
    folder.mkdir()
    write_domain(folder, "empty", model)
    registry = ModelRegistry(domains=load_domains([folder]), device=torch.device("cpu"), dtype=torch.float32)
    with TestClient(create_api_app(AppService(registry, GpuGate(1, 4)))) as client:
        response = predict(client, {"text": "猫"}, domain="empty")
    assert response.status_code == 503, response.text
    assert response.json()["field"] == "domain" and "SafetensorError" in response.json()["error"]
    assert str(tmp_path) not in response.text


def test_healthz_names_no_server_paths(client, registry):
    text = client.get("/healthz").text
    assert "tiny" in text and str(registry.domains["tiny"].model.path) not in text and "/tmp" not in text


def test_body_over_the_limit_is_413_before_parsing(client):
    body = b'{"text": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    response = client.post("/api/predict/tiny", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["field"] is None
    chunks = iter([b'{"text": "', b"a" * MAX_BODY_BYTES, b'"}'])
    response = client.post("/api/predict/tiny", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413, "a streamed body without content-length is cut off too"


def test_healthz_reports_domain_states(client, registry):
    data = client.get("/healthz").json()
    assert data["status"] == "ok" and data["ready"] is True
    assert data["domains"]["broken"] == "missing"
    assert data["domains"]["tiny"] in ("offline-ready", "loaded")


def test_out_of_memory_gives_advice_and_the_next_request_works(client, monkeypatch):
    real_generate = service.generate
    calls = []

    def generate_oom_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(service, "generate", generate_oom_once)
    response = predict(client, {"text": "猫", "num_images": 4, "seed": 1})
    assert response.status_code == 503
    assert "fewer images" in response.json()["error"] and "Traceback" not in response.text
    assert predict(client, {"text": "猫", "seed": 1}).status_code == 200


def test_unexpected_errors_are_500_without_a_traceback(client, monkeypatch):
    monkeypatch.setattr(service, "generate", lambda *a, **k: 1 / 0)
    response = predict(client, {"text": "猫"})
    assert response.status_code == 500
    assert "ZeroDivision" not in response.text and "Internal" in response.json()["error"]


def test_requests_are_serialized_through_the_gate(client, monkeypatch):
    running, overlaps = [], []

    def slow_generate(request, spec, **kwargs):
        running.append(1)
        overlaps.append(len(running))
        time.sleep(0.2)
        running.pop()
        raise RequestError("prompt", "stub", "桩")

    monkeypatch.setattr(service, "generate", slow_generate)
    # different step counts: requests that could share a batch would run as one (test_batching.py)
    threads = [threading.Thread(target=predict, args=(client, {"text": "猫", "num_inference_steps": 1 + i})) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1]


def test_gate_rejects_when_too_many_wait():
    gate = GpuGate(slots=1, max_waiting=1)
    holding, release = threading.Event(), threading.Event()

    def hold():
        with gate.slot():
            holding.set()
            release.wait(5)

    def wait_for_slot():
        with gate.slot():
            pass

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(5)
    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    deadline = time.time() + 5
    while gate.waiting < 1 and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(QueueFullError):
        with gate.slot():
            pass
    release.set()
    holder.join()
    waiter.join()
    with gate.slot():
        pass


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"content-type": "text/plain"}, 415),
        ({"content-type": "application/x-www-form-urlencoded"}, 415),
        ({"content-type": "multipart/form-data; boundary=x"}, 415),
        ({}, 415),
        ({"content-type": "application/json", "origin": "https://evil.example"}, 403),
        ({"content-type": "text/plain", "origin": "null"}, 415),
    ],
)
def test_what_a_page_on_another_site_can_send_is_refused_before_anything_runs(client, monkeypatch, headers, status):
    """Any web page could make its visitors' browsers spend the host's compute with a simple POST."""
    runs = []
    monkeypatch.setattr(service, "generate", lambda *args, **kwargs: runs.append(1))
    response = client.post("/api/predict/tiny", content='{"text": "猫", "num_inference_steps": 1}'.encode(), headers=headers)
    assert response.status_code == status and " / " in response.json()["error"]
    assert runs == []


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "application/json"},
        {"content-type": "application/octet-stream"},  # the PAI-EAS client's default
        {"content-type": "application/json", "origin": "http://testserver"},  # a page of this host
    ],
)
def test_json_clients_and_this_hosts_own_pages_are_served(client, headers):
    response = client.post("/api/predict/tiny", content='{"text": "猫", "num_inference_steps": 1}'.encode(), headers=headers)
    assert response.status_code == 200, response.text
