"""A public host, tried as a stranger would: only generation is callable, and the server bounds what it reads."""

import json
import socket
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from rapid_diffusion.generation import pipeline
from rapid_diffusion.service import app as service
from rapid_diffusion.domains import load_domains
from rapid_diffusion.models.registry import LoadedModel, ModelRegistry
from rapid_diffusion.service.app import AppService, GpuGate, UserFacingError

from helpers import write_domain
from helpers import running_server

GENERATION_APIS = {"generate", "generate_ui"}


@pytest.fixture()
def registry(tmp_path, tiny_model_dir, monkeypatch):
    folder = tmp_path / "domains"
    folder.mkdir()
    write_domain(folder, "tiny", tiny_model_dir, num_inference_steps=2)
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    return ModelRegistry(domains=load_domains([folder]), device=torch.device("cpu"), dtype=torch.float32)


# ----------------------------------------------------------------------------- who may load models


@pytest.mark.parametrize(
    "env, password, allowed",
    [
        ({}, None, True),
        ({"RAPID_DIFFUSION_PUBLIC": "1"}, None, False),
        ({"SPACE_ID": "someone/demo"}, None, False),
        ({"RAPID_DIFFUSION_PUBLIC": "1", "RAPID_DIFFUSION_FINETUNE_PASSWORD": "s3cret"}, "nope", False),
        ({"RAPID_DIFFUSION_PUBLIC": "1", "RAPID_DIFFUSION_FINETUNE_PASSWORD": "s3cret"}, "s3cret", True),
        ({"RAPID_DIFFUSION_FINETUNE_PASSWORD": "s3cret"}, None, False),
    ],
)
def test_loading_and_unloading_need_the_password_where_one_is_set(registry, monkeypatch, env, password, allowed):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = AppService(registry, GpuGate())
    if allowed:
        assert "tiny" in app.load("tiny", password) and registry.loaded()
        assert "tiny" in app.unload("tiny", password) and not registry.loaded()
        return
    for action in (app.load, app.unload):
        with pytest.raises(UserFacingError) as refused:
            action("tiny", password)
        assert refused.value.status == 403 and " / " in refused.value.message
    assert registry.loaded() == []


def queue_call(url: str, fn_index: int, data: list, session: str) -> None:
    response = httpx.post(
        f"{url}/gradio_api/queue/join",
        json={"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None},
    )
    assert response.status_code in (200, 404, 422), response.text


def drain(url: str, session: str, expected: int, timeout: float = 60) -> list[dict]:
    """Read the session's event stream until ``expected`` events completed."""
    done = []
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    done.append(message)
                if message.get("msg") == "close_stream" or len(done) >= expected:
                    break
    return done


@pytest.mark.slow
def test_a_stranger_on_a_public_host_can_only_generate(registry, monkeypatch, tmp_path):
    """Every event of the page, called by fn_index with the domain id in every field: nothing but generation runs."""
    from gradio_client import Client

    monkeypatch.setenv("RAPID_DIFFUSION_PUBLIC", "1")
    home = tmp_path / "home"
    with running_server(registry) as url:
        api = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
        assert set(api["named_endpoints"]) == {"/generate"} and not api["unnamed_endpoints"]
        page = httpx.get(f"{url}/config").json()
        assert "加载 / Load" not in json.dumps(page, ensure_ascii=False), "no load button is built"
        others = [d for d in page["dependencies"] if d.get("api_name") not in GENERATION_APIS and d.get("backend_fn")]
        assert others, "the page has helper events (token counter, domain defaults...)"
        for dependency in others:
            queue_call(url, dependency["id"], ["tiny"] * len(dependency["inputs"]), "stranger")
        drain(url, "stranger", expected=len(others))
    assert registry.loaded() == [], "no model was loaded by a stranger"
    written = [p for p in home.rglob("*") if p.is_file()] if home.exists() else []
    assert not [p for p in written if p.suffix in (".yaml", ".yml", ".json")], written


# ----------------------------------------------------------------------------- the JSON API's own shape


@pytest.fixture()
def app_client(registry):
    from rapid_diffusion.serving.server import create_app

    with TestClient(create_app(registry, GpuGate(1, 4))) as client:
        yield client


def test_wrong_method_is_405_and_unknown_api_paths_404_in_the_api_shape(app_client):
    response = app_client.get("/api/predict/tiny")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert set(response.json()) == {"error", "field"} and "POST" in response.json()["error"]
    for method, path in [("GET", "/api/nothing"), ("POST", "/api/predict"), ("DELETE", "/api/predict/tiny/x")]:
        response = app_client.request(method, path)
        assert response.status_code == 404, (method, path)
        assert set(response.json()) == {"error", "field"} and "没有这个接口" in response.json()["error"]
    assert app_client.get("/api/openapi.json").status_code == 200, "the API's own docs still answer"
    assert "swagger" in app_client.get("/docs").text.lower(), "and its OpenAPI page, not the UI"
    assert app_client.get("/").status_code == 200, "and the UI"


@pytest.mark.slow
def test_with_an_api_token_on_a_public_host_the_json_api_needs_it_and_the_web_ui_keeps_its_own_rules(registry, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_PUBLIC", "1")
    monkeypatch.setenv("RAPID_DIFFUSION_API_TOKEN", "public-host-token")
    body = json.dumps({"text": "猫", "seed": 1, "num_inference_steps": 1})
    with running_server(registry) as url:
        refused = httpx.post(f"{url}/api/predict/tiny", content=body, headers={"content-type": "application/json"})
        assert refused.status_code == 401 and "needs a token" in refused.json()["error"]
        page = httpx.post(f"{url}/api/predict/tiny", content=body, headers={"content-type": "text/plain", "origin": url,
                                                                           "authorization": "public-host-token"})
        assert page.status_code == 415, "a simple request is refused even with the token"
        answered = httpx.post(f"{url}/api/predict/tiny", content=body, headers={"content-type": "application/json",
                                                                               "authorization": "public-host-token"}, timeout=60)
        assert answered.status_code == 200 and answered.json()["seeds"] == [1]
        posted = httpx.post(f"{url}/gradio_api/call/generate", content=json.dumps({"data": ["猫", None, "tiny", 1, None, 1, None, None, None]}),
                            headers={"content-type": "application/json"})
        assert posted.status_code == 200, posted.text
        answer = httpx.get(f"{url}/gradio_api/call/generate/{posted.json()['event_id']}", timeout=60).text
        assert answer.startswith("event: complete"), "a stranger still generates in the web UI, without the token"
        assert httpx.get(f"{url}/docs").status_code == 200 and httpx.get(f"{url}/healthz").status_code == 200


# ----------------------------------------------------------------------------- what the server reads


def multipart(files: int, size: int) -> tuple[bytes, str]:
    boundary = "rapid-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="f{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + b"\0" * size + b"\r\n"
        for i in range(files)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("streamed", [False, True], ids=["declared", "streamed"])
def test_an_upload_over_the_total_budget_is_413(registry, monkeypatch, streamed):
    from rapid_diffusion.serving.server import create_app

    monkeypatch.setenv("RAPID_DIFFUSION_MAX_UPLOAD_TOTAL", str(3 * 2**20))
    body, content_type = multipart(files=5, size=900 * 1024)  # each under the per-file cap, 4.4 MB in all
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if streamed else body
    with TestClient(create_app(registry, GpuGate(1, 4))) as client:
        response = client.post("/gradio_api/upload", content=content, headers={"content-type": content_type})
        assert response.status_code == 413, response.text
        assert "上传总量超过 3 MB" in response.json()["error"]
        small, content_type = multipart(files=2, size=900 * 1024)
        response = client.post("/gradio_api/upload", content=small, headers={"content-type": content_type})
        assert response.status_code == 200 and len(response.json()) == 2, "uploads within the budget still work"


def read_until_closed(connection: socket.socket) -> bytes:
    """The rest of a response the server sends with ``connection: close`` (headers and body may arrive apart)."""
    chunks = []
    while chunk := connection.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_slow_request_body_is_timed_out(registry, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_BODY_TIMEOUT", "1")
    with running_server(registry) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            start = time.monotonic()
            connection.sendall(
                b"POST /api/predict/tiny HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n" + b'{"text": "'
            )
            first = connection.recv(4096)
            elapsed = time.monotonic() - start
            answer = (first + read_until_closed(connection)).decode("utf-8", "replace")
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "请求体发送过慢" in answer and 0.9 <= elapsed < 5


@pytest.mark.slow
def test_a_client_that_disconnects_gives_up_its_place_in_the_queue(registry, monkeypatch):
    runs = []
    real_run = LoadedModel.run
    monkeypatch.setattr(LoadedModel, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    gate = GpuGate(1, 4)
    with running_server(registry, gate) as url:
        with gate.slot():  # someone else is generating
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/api/predict/tiny", json={"text": "猫", "seed": 1}, timeout=1.0)
            deadline = time.monotonic() + 5
            while gate.waiting and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gate.waiting == 0, "the abandoned request left the queue while the GPU was busy"
        time.sleep(0.5)
        assert runs == [], "and never ran"
        response = httpx.post(f"{url}/api/predict/tiny", json={"text": "猫", "seed": 1}, timeout=60)
        assert response.status_code == 200 and runs == [1]


def test_a_running_generation_stops_when_asked(registry):
    """The API's should_stop reaches the denoising loop: a set flag ends the run at the next step."""
    calls = []

    def stop_after_first_step():
        calls.append(1)
        return len(calls) > 1

    request = pipeline.GenerationRequest(prompt="猫", num_inference_steps=4)
    with pytest.raises(service.GenerationCancelled):
        AppService(registry, GpuGate()).generate(request, "tiny", should_stop=stop_after_first_step)
    assert 1 < len(calls) <= 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("seed", 1.5, "「seed」无效：须为 0 到 4294967295 之间的整数"),
        ("num_inference_steps", 4.6, "「num_inference_steps」无效"),
        ("num_images", 1.7, "「num_images」无效"),
        ("num_inference_steps", "abc", "「num_inference_steps」无效"),
        ("guidance_scale", float("nan"), "「guidance_scale」无效"),
        ("num_inference_steps", float("inf"), "「num_inference_steps」无效"),
    ],
)
def test_the_named_api_refuses_what_the_ui_refuses_with_the_same_reasons(registry, field, value, reason):
    """/generate used to round 1.5 to 2 and answer NaN or "abc" with {"error": null} (a raw client:
    gradio_client cannot even send NaN)."""
    names = ["prompt", "negative_prompt", "domain", "num_inference_steps", "guidance_scale", "seed", "num_images",
             "sampler", "super_resolution"]
    data = ["猫", None, "tiny", None, None, None, None, None, None]
    data[names.index(field)] = value
    with running_server(registry) as url:
        posted = httpx.post(f"{url}/gradio_api/call/generate", content=json.dumps({"data": data}),
                            headers={"content-type": "application/json"})
        assert posted.status_code == 200, posted.text
        answer = httpx.get(f"{url}/gradio_api/call/generate/{posted.json()['event_id']}", timeout=60).text
    event, data_line = answer.strip().split("\n")[:2]
    error = json.loads(data_line.removeprefix("data:"))["error"]
    assert event == "event: error" and reason in error and " / Invalid " in error, answer
    assert registry.loaded() == [], "refused before any model was loaded"
