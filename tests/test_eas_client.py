"""The JSON API called by the official PAI-EAS client (``eas-prediction``), as it is, against the real server.

The server runs with a token (``RAPID_DIFFUSION_API_TOKEN``); the client signs its requests
(``set_token``: ``Authorization: EAS <HMAC-SHA1>``) or, with ``custom_url``, sends the token as is.
Nothing here signs a request itself: every signature comes from the client's own code.
"""

import base64
import datetime
import io
import json
import logging
import threading
import time
import types

import httpx
import numpy as np
import pytest
import torch
from eas_prediction import PredictClient, PredictException, StringRequest
from PIL import Image

from rapid_diffusion.domains import load_domains
from rapid_diffusion.generation.pipeline import GenerationCancelled, read_png_settings
from rapid_diffusion.models.registry import LoadedModel, ModelRegistry

from helpers import REPO_ROOT, running_server, write_domain

TOKEN = "eas-token-3f9a"


@pytest.fixture(scope="module")
def url(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("eas-domains")
    write_domain(folder, "tiny", tiny_model_dir, num_inference_steps=1)
    registry = ModelRegistry(domains=load_domains([folder]), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAPID_DIFFUSION_API_TOKEN", TOKEN)  # read per request: each test's settings see it
        with running_server(registry) as served:
            yield served


def signed_client(url: str, token: str = TOKEN, timeout_ms: int = 60_000) -> PredictClient:
    client = PredictClient(url, "tiny")
    client.set_token(token)
    client.set_timeout(timeout_ms)
    client.init()
    return client


def plain_client(url: str, token: str = TOKEN) -> PredictClient:
    client = PredictClient(custom_url=f"{url}/api/predict/tiny")
    client.set_token(token)
    client.set_timeout(60_000)
    client.init()
    return client


def ask(client: PredictClient, body) -> dict | list:
    return json.loads(client.predict(StringRequest(json.dumps(body, ensure_ascii=False))).response_data)


def pixels(image_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_base64))), dtype=np.int16)


def test_the_signed_and_the_plain_form_both_pass_and_give_the_same_image(url):
    body = {"text": "左边有一个大的红色圆形", "seed": 3}
    signed = ask(signed_client(url), body)
    plain = ask(plain_client(url), body)
    assert read_png_settings(base64.b64decode(signed["images_base64"][0]))["seed"] == 3
    assert np.abs(pixels(signed["images_base64"][0]) - pixels(plain["images_base64"][0])).max() <= 1


@pytest.mark.parametrize("make", [signed_client, plain_client], ids=["signed", "plain"])
def test_a_wrong_or_missing_token_is_a_401_predict_exception(url, make):
    for token in ("wrong", ""):
        with pytest.raises(PredictException) as refused:
            ask(make(url, token), {"text": "猫"})
        assert refused.value.code == 401
        reason = json.loads(refused.value.message)["error"]
        assert ("Wrong token" in reason or "needs a token" in reason) and " / " in reason


def test_without_a_token_set_the_client_without_a_token_passes(url, monkeypatch):
    """The client then sends neither a token nor a Content-Type; no browser sends a POST without Origin."""
    monkeypatch.delenv("RAPID_DIFFUSION_API_TOKEN")
    assert ask(signed_client(url, ""), {"text": "猫", "seed": 5})["seeds"] == [5]


@pytest.mark.parametrize("zone", ["Asia/Shanghai", "Pacific/Kiritimati", "Etc/GMT+12"])
def test_a_client_whose_clock_is_in_another_time_zone_passes(url, monkeypatch, zone):
    """The client stamps Date with its local time labelled GMT; from -12 h to +14 h, that is no replay."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        assert abs(datetime.datetime.now() - datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)) > datetime.timedelta(hours=7)
        assert ask(signed_client(url), {"text": "猫", "seed": 1})["seeds"] == [1]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


class Clock:
    """Stands in for the ``datetime`` the client reads its time from."""

    shift = datetime.timedelta(0)

    @classmethod
    def now(cls):
        return datetime.datetime.now() + cls.shift


def test_a_signature_replayed_later_or_on_another_body_or_path_is_refused(url, monkeypatch):
    import eas_prediction.predict_client as client_module

    monkeypatch.setattr(client_module, "datetime", types.SimpleNamespace(datetime=Clock))
    Clock.shift = -datetime.timedelta(days=2)
    with pytest.raises(PredictException) as stale:
        ask(signed_client(url), {"text": "猫"})
    assert stale.value.code == 401 and "Date" in json.loads(stale.value.message)["error"]
    Clock.shift = -datetime.timedelta(hours=15)
    with pytest.raises(PredictException) as outside:
        ask(signed_client(url), {"text": "猫"})
    assert outside.value.code == 401, "15 h behind UTC is no time zone's clock"
    Clock.shift = datetime.timedelta(0)
    client = signed_client(url)
    body = json.dumps({"text": "猫", "seed": 1}).encode()
    headers = client.generate_singaure(bytearray(body))
    assert httpx.post(f"{url}/api/predict/tiny", content=body, headers=headers, timeout=60).status_code == 200, "the control passes"
    other_body = json.dumps({"text": "狗", "seed": 1}).encode()
    headers_without_md5 = {k: v for k, v in headers.items() if k != "Content-MD5"}
    for content, sent, path in [(other_body, headers, "tiny"), (other_body, headers_without_md5, "tiny"), (body, headers, "other")]:
        response = httpx.post(f"{url}/api/predict/{path}", content=content, headers={**sent, "Content-Length": str(len(content))}, timeout=60)
        assert response.status_code == 401, (content, path)


def test_the_documented_client_example_runs_as_written(url):
    """docs/api.md's example (a record, then a list of records) against this server: only the endpoint,
    the domain and the token are swapped in."""
    text = (REPO_ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    example = text.split("### With the official PAI-EAS client", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    for placeholder, value in [("http://127.0.0.1:7860", url), ('"demo"', '"tiny"'), ("<RAPID_DIFFUSION_API_TOKEN>", TOKEN)]:
        assert placeholder in example
        example = example.replace(placeholder, value)
    namespace: dict = {}
    exec(compile(example, "docs/api.md", "exec"), namespace)
    answer, answers = namespace["answer"], namespace["answers"]
    assert (answer["idx"], answer["text"], answer["seeds"]) == (0, "左边有一个大的红色圆形", [42])
    assert namespace["png"].startswith(b"\x89PNG") and answer["gen_imgbase64"] == answer["images_base64"][0]
    assert [(a["idx"], a["text"]) for a in answers] == [(0, "红色圆形"), (1, "蓝色正方形")]


def test_a_client_that_gives_up_is_logged_once_per_request_and_its_generation_stops(url, monkeypatch, caplog):
    """The client's timeout (5 s by default) makes it send the request again: each try is one warning."""
    caplog.set_level(logging.WARNING, "rapid_diffusion")
    started, stopped = [], []
    pace = threading.Event()

    def run_until_stopped(self, spec, requests, *, progress=None, should_stop=None, **kwargs):
        started.append(1)
        deadline = time.monotonic() + 30
        while not should_stop() and time.monotonic() < deadline:
            progress(0, 1)  # a denoising step: the service checks for a leaver after each
            pace.wait(0.05)
        stopped.append(should_stop())
        raise GenerationCancelled("stopped")

    monkeypatch.setattr(LoadedModel, "run", run_until_stopped)
    client = signed_client(url, timeout_ms=500)
    client.set_retry_count(2)
    with pytest.raises(PredictException):
        ask(client, {"text": "猫"})
    deadline = time.monotonic() + 30
    while (len(stopped) < 2 or len(leavers(caplog)) < 2) and time.monotonic() < deadline:
        pace.wait(0.05)
    assert started == [1, 1] and stopped == [True, True], "each try started once and was stopped, not run out"
    assert len(leavers(caplog)) == 2 and all(record.levelno == logging.WARNING for record in leavers(caplog))
    assert "set_timeout" in leavers(caplog)[0].getMessage()


def leavers(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if "disconnected" in record.getMessage()]


def test_the_token_is_not_in_what_the_server_answers(url):
    """A 401 says why, never what the token is; the open pages do not carry it either."""
    refused = httpx.post(f"{url}/api/predict/tiny", content=b"{}", headers={"content-type": "application/json", "authorization": TOKEN[:-1]})
    assert refused.status_code == 401 and TOKEN[:-1] not in refused.text
    for page in ("/healthz", "/api/openapi.json", "/docs"):
        response = httpx.get(url + page)
        assert response.status_code == 200 and TOKEN not in response.text, page
