"""No input of any event can make the server read or serve a file the visitor did not upload.

A Gradio ``FileData`` dict (``{"path": ..., "meta": {"_type": "gradio.FileData"}}``) sent as the
value of any input used to make Gradio copy that file into its cache and answer with its URL
(``/proc/self/environ`` with the owner's password in it, files in the owner's home folder).
These tests send such dicts, naming a canary file and ``/proc/self/environ``, into every input of
every event of the page (by ``fn_index`` and by name), in public and private mode, and check
that nothing of them comes back, while a visitor's own uploads still work.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from rapid_diffusion.domains import load_domains
from rapid_diffusion.serving.guards import UploadLedger, file_paths
from rapid_diffusion.models.registry import ModelRegistry

from helpers import running_server, write_domain

FILE_URL = re.compile(r"/gradio_api/file=[^\"'\\\s]+")


@pytest.fixture()
def canary(tmp_path, monkeypatch) -> tuple[Path, str]:
    """A file only the server can read, and a secret in the server's environment."""
    secret = f"CANARY-{uuid.uuid4().hex}"
    path = tmp_path / "owner-notes.txt"
    path.write_text(secret)
    monkeypatch.setenv("RAPID_DIFFUSION_TEST_SECRET", secret)
    return path, secret


@pytest.fixture()
def registry(tmp_path, tiny_model_dir, monkeypatch):
    folder = tmp_path / "domains"
    folder.mkdir()
    write_domain(folder, "tiny", tiny_model_dir, num_inference_steps=2)
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    return ModelRegistry(domains=load_domains([folder]), device=torch.device("cpu"), dtype=torch.float32)


def file_data(path: str, meta: bool = True) -> dict:
    value = {"path": path, "orig_name": Path(path).name}
    return {**value, "meta": {"_type": "gradio.FileData"}} if meta else value


def events(url: str) -> list[dict]:
    page = httpx.get(f"{url}/config").json()
    return [d for d in page["dependencies"] if d.get("backend_fn")]


def join(client: httpx.Client, url: str, fn_index: int, data: list) -> httpx.Response:
    session = uuid.uuid4().hex
    return client.post(
        f"{url}/gradio_api/queue/join",
        json={"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None},
    )


def everything_served(client: httpx.Client, url: str, answers: list[str]) -> str:
    """The answers plus the content of every file URL they name."""
    served = list(answers)
    for text in answers:
        for file_url in FILE_URL.findall(text):
            served.append(client.get(url + file_url).text)
    return "\n".join(served)


@pytest.mark.slow
@pytest.mark.parametrize("public", [False, True], ids=["private", "public"])
def test_no_input_of_any_event_reads_a_server_file(registry, canary, monkeypatch, public):
    path, secret = canary
    if public:
        monkeypatch.setenv("RAPID_DIFFUSION_PUBLIC", "1")
    targets = [file_data(str(path)), file_data("/proc/self/environ"), file_data(str(path), meta=False),
               file_data(f"/tmp/gradio/../../{path}")]
    answers = []
    with running_server(registry) as url, httpx.Client(timeout=30) as client:
        client.get(url)  # a visitor with a cookie, as a browser is
        dependencies = events(url)
        assert len(dependencies) >= (10 if public else 30), "every tab's events are on the page"
        for dependency in dependencies:
            for position in range(len(dependency["inputs"])):
                for target in targets:
                    data = [None] * len(dependency["inputs"])
                    data[position] = target
                    response = join(client, url, dependency["id"], data)
                    answers.append(response.text)
                    assert response.status_code == 403, (dependency.get("api_name"), position, response.text)
                    assert "只能使用你在本次会话中上传的文件" in response.json()["error"]
        for route in ("run", "call", "api"):
            for position in range(9):
                data = [None] * 9
                data[position] = file_data(str(path))
                response = client.post(f"{url}/gradio_api/{route}/generate", json={"data": data})
                answers.append(response.text)
                assert response.status_code == 403, (route, position, response.text)
        response = client.post(f"{url}/gradio_api/component_server",
                               json={"data": file_data(str(path)), "component_id": 1, "fn_name": "x", "session_hash": "s"})
        assert response.status_code == 403
        for fetch in (f"/gradio_api/file={path}", "/gradio_api/file=/proc/self/environ",
                      "/gradio_api/file=http://127.0.0.1:1/x", "/gradio_api/proxy=http://example.com/x"):
            response = client.get(url + fetch)
            answers.append(response.text)
            assert response.status_code == 403, fetch
        served = everything_served(client, url, answers)
    assert secret not in served
    cache = Path("/tmp/gradio")
    copied = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size < 2**20 and secret.encode() in p.read_bytes()] if cache.exists() else []
    assert copied == [], "nothing was copied into Gradio's cache"


@pytest.mark.slow
def test_a_visitor_may_name_its_own_upload_and_only_its_own(registry):
    """The negative control: the guard lets a visitor's own upload through, in a file input and
    even in a text box (Gradio copies the visitor's own file, harmless); another visitor naming
    the same path is refused."""
    with running_server(registry) as url, httpx.Client(timeout=60) as owner, httpx.Client(timeout=60) as stranger:
        owner.get(url)
        stranger.get(url)
        uploaded = owner.post(f"{url}/gradio_api/upload", files={"files": ("mine.txt", b"my own caption")})
        assert uploaded.status_code == 200, uploaded.text
        [upload_path] = uploaded.json()
        caption_rows = next(d for d in events(url) if len(d["inputs"]) == 1 and any(
            c["id"] == d["inputs"][0] and c.get("type") == "file" for c in httpx.get(f"{url}/config").json()["components"]))
        assert join(owner, url, caption_rows["id"], [[file_data(upload_path)]]).status_code == 200
        assert join(stranger, url, caption_rows["id"], [[file_data(upload_path)]]).status_code == 403


def test_the_ledger_keeps_each_visitors_uploads_apart_and_forgets_them():
    ledger = UploadLedger(lifetime_s=3600)
    ledger.record("visitor-a" * 3, ["/tmp/gradio/1/a.png"])
    assert ledger.owns("visitor-a" * 3, "/tmp/gradio/1/a.png")
    assert not ledger.owns("visitor-b" * 3, "/tmp/gradio/1/a.png")
    assert not ledger.owns(None, "/tmp/gradio/1/a.png")
    assert not ledger.owns("visitor-a" * 3, "/tmp/gradio/1/../1/a.png"), "only the exact path Gradio answered"
    expired = UploadLedger(lifetime_s=0)
    expired.record("visitor-a" * 3, ["/tmp/gradio/1/a.png"])
    assert not expired.owns("visitor-a" * 3, "/tmp/gradio/1/a.png")


def test_file_references_are_found_at_any_depth():
    data = [None, "text", {"headers": [], "data": [["a", {"path": "/x", "meta": {}}]]}, [[{"path": "/y"}]], {"path": 3}]
    assert sorted(file_paths(data)) == ["/x", "/y"]
    assert list(file_paths(json.loads('{"data": ["no files"]}'))) == []
