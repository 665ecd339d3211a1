"""The PAI-EAS-compatible JSON endpoint and the GPU gate it shares with the UI."""

import base64
import io
import json
import logging
import threading
import time
from email.utils import formatdate

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from rapid_diffusion.serving.api import MAX_BODY_BYTES, create_api_app
from rapid_diffusion.service.app import AppService, GpuGate, QueueFullError
from rapid_diffusion.access import ApiTokenCheck
from rapid_diffusion.domains import load_domains
from rapid_diffusion.generation.pipeline import read_png_settings
from rapid_diffusion.generation.request import Limits, RequestError
from rapid_diffusion.models.registry import LoadedModel, ModelRegistry

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


def predict(client, body, domain="tiny", headers=None):
    """POST ``body`` as JSON (NaN written as JSON's NaN, as Python's json does)."""
    return client.post(f"/api/predict/{domain}", content=json.dumps(body).encode(), headers={"content-type": "application/json", **(headers or {})})


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
    response = client.post("/api/predict/tiny", json="猫")
    assert response.status_code == 400 and "Invalid body" in response.json()["error"] and "请求体无效" in response.json()["error"]
    response = client.post("/api/predict/tiny", json=["猫"])
    assert response.status_code == 422 and response.json()["field"] == "[0]", "a list is records; its first one is not an object"


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
        ({"prompt": 5}, "prompt"),
        ({"text": "猫", "prompt": "狗"}, "prompt"),
        ([{"text": "猫"}, {"text": "猫", "seed": "1"}], "[1].seed"),
        ([{"text": "猫"}, {"idx": 1}], "[1].text"),
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
        ({"prompt": "   "}, "prompt"),
        ({"text": "猫" * 1001}, "text"),
        ({"text": "猫", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"text": "猫", "seed": 2**32 - 1, "num_images": 2}, "seed"),
        ([{"text": "猫"}, {"prompt": " ", "idx": 7}], "[1].prompt"),
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
    real_run = LoadedModel.run
    calls = []

    def run_oom_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "run", run_oom_once)
    response = predict(client, {"text": "猫", "num_images": 4, "seed": 1})
    assert response.status_code == 503
    assert "fewer images" in response.json()["error"] and "Traceback" not in response.text
    assert predict(client, {"text": "猫", "seed": 1}).status_code == 200


def test_unexpected_errors_are_500_without_a_traceback(client, monkeypatch):
    monkeypatch.setattr(LoadedModel, "run", lambda *a, **k: 1 / 0)
    response = predict(client, {"text": "猫"})
    assert response.status_code == 500
    assert "ZeroDivision" not in response.text and "Internal" in response.json()["error"]


def test_requests_are_serialized_through_the_gate(client, monkeypatch):
    running, overlaps = [], []

    def slow_run(self, spec, requests, **kwargs):
        running.append(1)
        overlaps.append(len(running))
        time.sleep(0.2)
        running.pop()
        raise RequestError("prompt", "stub", "桩")

    monkeypatch.setattr(LoadedModel, "run", slow_run)
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
        ({"origin": "https://evil.example"}, 403),
        ({"content-type": "application/json", "origin": "https://evil.example"}, 403),
        ({"content-type": "text/plain", "origin": "null"}, 403),
        ({"content-type": "text/plain", "origin": "http://testserver"}, 415),
    ],
)
def test_what_a_page_on_another_site_can_send_is_refused_before_anything_runs(client, monkeypatch, headers, status):
    """Any web page could make its visitors' browsers spend the host's compute with a simple POST."""
    runs = []
    monkeypatch.setattr(LoadedModel, "run", lambda *args, **kwargs: runs.append(1))
    response = client.post("/api/predict/tiny", content='{"text": "猫", "num_inference_steps": 1}'.encode(), headers=headers)
    assert response.status_code == status and " / " in response.json()["error"]
    assert runs == []


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "application/json"},
        {"content-type": "application/octet-stream"},  # the PAI-EAS client's default, with a token
        {},  # the PAI-EAS client without a token sends no type (and, not being a browser, no Origin)
        {"content-type": "application/json", "origin": "http://testserver"},  # a page of this host
    ],
)
def test_json_clients_and_this_hosts_own_pages_are_served(client, headers):
    response = client.post("/api/predict/tiny", content='{"text": "猫", "num_inference_steps": 1}'.encode(), headers=headers)
    assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------- EasyNLP records


def test_an_easynlp_record_is_answered_with_idx_text_and_gen_imgbase64_beside_the_usual_fields(client):
    body = {"idx": "a-7", "text": "一只橘猫在窗台上", "num_inference_steps": 1, "num_images": 2, "seed": 11}
    data = predict(client, body).json()
    assert (data["idx"], data["text"], data["seeds"]) == ("a-7", body["text"], [11, 12])
    assert data["gen_imgbase64"] == data["images_base64"][0], "EasyNLP's field holds the first image"
    assert base64.b64decode(data["gen_imgbase64"], validate=True).startswith(b"\x89PNG"), "standard base64, as EasyNLP writes it"
    plain = predict(client, {k: v for k, v in body.items() if k != "idx"}).json()
    assert "idx" not in plain and "gen_imgbase64" not in plain, "a body without idx keeps the plain shape"
    assert plain["images_base64"] == data["images_base64"]


def test_a_list_of_records_is_answered_in_order_each_as_if_sent_alone(client):
    records = [{"idx": 2, "text": "红色圆形", "seed": 5, "num_inference_steps": 1},
               {"prompt": "蓝色正方形", "seed": 6, "num_inference_steps": 1}]
    answers = predict(client, records).json()
    assert [a.get("idx") for a in answers] == [2, None] and [a["text"] for a in answers] == ["红色圆形", "蓝色正方形"]
    alone = predict(client, records[1]).json()
    assert np.abs(pixels(alone["images_base64"][0]) - pixels(answers[1]["images_base64"][0])).max() <= 1
    assert np.abs(pixels(answers[0]["images_base64"][0]) - pixels(answers[1]["images_base64"][0])).max() > 1, "not the other record's image"


def test_records_are_bounded_like_requests_and_all_checked_before_any_runs(client, monkeypatch):
    runs = []
    monkeypatch.setattr(LoadedModel, "run", lambda *args, **kwargs: runs.append(1))
    max_records = Limits.from_env().max_images
    response = predict(client, [{"text": "猫"}] * (max_records + 1))
    assert response.status_code == 400 and response.json()["field"] is None
    assert f"at most {max_records} items, got {max_records + 1}" in response.json()["error"] and "最多" in response.json()["error"]
    response = predict(client, [])
    assert response.status_code == 400 and "at least 1" in response.json()["error"]
    response = predict(client, [{"text": "猫", "num_inference_steps": 1}, {"text": "猫", "seed": 2**32 - 1, "num_images": 2}])
    assert response.status_code == 422 and response.json()["field"] == "[1].seed"
    assert runs == [], "the first record was not generated for a list the server refuses"


# ----------------------------------------------------------------------------- the OpenAPI page


def test_the_openapi_page_lists_every_field_with_its_bound_and_an_example(client):
    assert client.get("/docs").status_code == 200 and "swagger" in client.get("/docs").text.lower()
    schema = client.get("/api/openapi.json").json()
    record = schema["components"]["schemas"]["PredictRecord"]
    limits = Limits.from_env()
    fields = record["properties"]
    assert set(fields) == {"text", "idx", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "num_images", "super_resolution"}
    assert all(field.get("examples") and field.get("description") for field in fields.values()), "every field has an example and a line"
    bounds = {name: [option for option in field.get("anyOf", [field]) if option.get("type") != "null"][0] for name, field in fields.items()}
    assert bounds["num_inference_steps"]["maximum"] == limits.max_steps and bounds["num_images"]["maximum"] == limits.max_images
    assert bounds["guidance_scale"]["maximum"] == limits.max_guidance and bounds["text"]["maxLength"] == limits.max_prompt_chars
    assert (bounds["seed"]["minimum"], bounds["seed"]["maximum"]) == (-1, 2**32 - 1)
    body = schema["paths"]["/api/predict/{domain}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    listed = [option for option in body["oneOf"] if option.get("type") == "array"][0]
    assert listed["maxItems"] == limits.max_images, "a list of records is documented with its bound"


def test_the_bounds_follow_the_hosts_limits(registry, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_MAX_STEPS", "9")
    with TestClient(create_api_app(AppService(registry, GpuGate(1, 4)))) as tight:
        response = predict(tight, {"text": "猫", "num_inference_steps": 10})
        assert response.status_code == 422 and "must be at most 9, got 10" in response.json()["error"]
        assert "须不大于 9" in response.json()["error"]


# ----------------------------------------------------------------------------- the token (the official client: test_eas_client.py)

TOKEN = "s3cret-token"


@pytest.mark.parametrize(
    "headers, reason",
    [
        ({}, "needs a token"),
        ({"authorization": "wrong"}, "Wrong token"),
        ({"authorization": TOKEN + " "}, "Wrong token"),
        ({"authorization": "EAS bm90IGEgc2lnbmF0dXJl", "date": formatdate(time.time() - 2 * 86400, usegmt=True)}, "Date"),
        ({"authorization": "EAS bm90IGEgc2lnbmF0dXJl", "date": formatdate(time.time(), usegmt=True)}, "Wrong token"),
        ({"authorization": "EAS bm90IGEgc2lnbmF0dXJl"}, "Date"),
    ],
)
def test_with_a_token_set_every_api_route_refuses_a_missing_or_wrong_one_with_401(client, monkeypatch, headers, reason):
    monkeypatch.setenv("RAPID_DIFFUSION_API_TOKEN", TOKEN)
    runs = []
    monkeypatch.setattr(LoadedModel, "run", lambda *args, **kwargs: runs.append(1))
    for method, path in [("POST", "/api/predict/tiny"), ("GET", "/api/predict/tiny"), ("POST", "/api/nothing")]:
        response = client.request(method, path, content='{"text": "猫"}'.encode(), headers={"content-type": "application/json", **headers})
        assert response.status_code == 401, (method, path, response.text)
        assert reason in response.json()["error"] and " / " in response.json()["error"] and response.headers["www-authenticate"] == "EAS"
    assert runs == []
    assert client.get("/healthz").status_code == 200 and client.get("/docs").status_code == 200, "read-only pages stay open"


def test_with_a_token_set_the_plain_form_passes_and_cross_site_requests_are_still_refused(client, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_API_TOKEN", TOKEN)
    body = '{"text": "猫", "num_inference_steps": 1}'.encode()
    ok = client.post("/api/predict/tiny", content=body, headers={"content-type": "application/json", "authorization": TOKEN})
    assert ok.status_code == 200, ok.text
    simple = client.post("/api/predict/tiny", content=body, headers={"content-type": "text/plain", "authorization": TOKEN})
    assert simple.status_code == 415
    foreign = client.post("/api/predict/tiny", content=body,
                          headers={"content-type": "application/json", "authorization": TOKEN, "origin": "https://evil.example"})
    assert foreign.status_code == 403


def test_the_token_can_come_from_a_file_and_a_bad_token_setting_stops_the_start(registry, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    monkeypatch.setenv("RAPID_DIFFUSION_API_TOKEN_FILE", str(token_file))
    with TestClient(create_api_app(AppService(registry, GpuGate(1, 4)))) as guarded:
        assert predict(guarded, {"text": "猫"}, domain="nope").status_code == 401
        assert predict(guarded, {"text": "猫"}, domain="nope", headers={"authorization": TOKEN}).status_code == 404
    monkeypatch.setenv("RAPID_DIFFUSION_API_TOKEN", TOKEN)
    with pytest.raises(ValueError, match="not both"):
        create_api_app(AppService(registry, GpuGate(1, 4)))
    monkeypatch.delenv("RAPID_DIFFUSION_API_TOKEN")
    monkeypatch.setenv("RAPID_DIFFUSION_API_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot be read"):
        create_api_app(AppService(registry, GpuGate(1, 4)))


@pytest.mark.parametrize(
    "offset_s, in_window",
    [(0, True), (-12 * 3600 - 899, True), (14 * 3600 + 899, True), (-12 * 3600 - 901, False), (14 * 3600 + 901, False), (-2 * 86400, False)],
)
def test_a_signed_dates_window_is_the_worlds_time_zones_plus_the_skew(offset_s, in_window):
    """Inside the window a bad signature is "wrong"; outside it the Date is refused first."""
    now = 1_800_000_000.0
    check = ApiTokenCheck(TOKEN, max_skew_s=900)
    reason = check.refusal("EAS bm90IGEgc2lnbmF0dXJl", method="POST", path="/api/predict/tiny", body=b"{}",
                           content_type="application/json", content_md5=None, date=formatdate(now + offset_s, usegmt=True), now=now)
    assert reason == ("api_token_wrong" if in_window else "api_token_date")
