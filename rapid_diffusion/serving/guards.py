"""Files a visitor's events may name: only those this visitor uploaded.

Gradio turns any ``{"path": ...}`` object inside an event's data into a file it copies into
its cache and serves back, whatever component the value was sent to: a ``FileData`` dict typed
into the prompt made the server copy ``/proc/self/environ``. Gradio checks such paths only
once ``Blocks.launch`` has run, which a ``gr.mount_gradio_app`` server never does. This guard
does not depend on that: it sits in front of every route that accepts event data and lets a
file reference through only when this visitor uploaded that exact file.

* A visitor is a random cookie (``rd_visitor``), set on the first response it gets.
* ``POST /gradio_api/upload``: the paths Gradio answers with are recorded for the visitor.
* Event routes (``queue/join``, ``run``, ``call``, ``api``, ``stream``, ``component_server``):
  the body is read (at most ``max_event_bytes``), every object with a string ``path`` anywhere
  in it must be one of the visitor's recorded uploads, else 403 before Gradio sees anything.
* ``/gradio_api/file=<http URL>`` and ``/gradio_api/proxy=``: 403. This app never serves
  another site's files, so the server is not a proxy for strangers.

On an HTTPS host (a Space, which shows the app in an iframe on huggingface.co) the cookie is
``SameSite=None; Secure; Partitioned`` so browsers keep it inside the frame.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from http.cookies import SimpleCookie
from typing import Any, Iterator
from urllib.parse import unquote

from ..messages import say

log = logging.getLogger(__name__)

VISITOR_COOKIE = "rd_visitor"
UPLOAD_ROUTE = "/gradio_api/upload"
EVENT_ROUTES = (
    "/gradio_api/queue/join", "/gradio_api/run/", "/gradio_api/api/", "/gradio_api/call/",
    "/gradio_api/stream/", "/gradio_api/component_server",
)
FETCH_ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/gradio_api/proxy=")
MAX_EVENT_BYTES = 16 * 2**20
UPLOAD_LIFETIME_S = 2 * 3600  # Gradio's cache deletes uploads after an hour (ui.py: delete_cache)
MAX_VISITORS = 10_000
MAX_FILES_PER_VISITOR = 10_000


class UploadLedger:
    """Which upload paths belong to which visitor, for ``UPLOAD_LIFETIME_S``; bounded in size."""

    def __init__(self, lifetime_s: float = UPLOAD_LIFETIME_S):
        self.lifetime_s = lifetime_s
        self._files: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, visitor: str, paths: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            owned = self._files.setdefault(visitor, {})
            self._files.move_to_end(visitor)
            owned.update((path, now) for path in paths)
            while len(owned) > MAX_FILES_PER_VISITOR:
                owned.pop(next(iter(owned)))
            while len(self._files) > MAX_VISITORS:
                self._files.popitem(last=False)

    def owns(self, visitor: str | None, path: str) -> bool:
        if visitor is None:
            return False
        with self._lock:
            recorded = self._files.get(visitor, {}).get(path)
        return recorded is not None and time.monotonic() - recorded < self.lifetime_s


def file_paths(data: Any) -> Iterator[str]:
    """Every ``path`` of a file-like object (a dict with a string ``path``) anywhere in ``data``."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("path"), str):
                yield item["path"]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class FileGuard:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app, ledger: UploadLedger | None = None, max_event_bytes: int = MAX_EVENT_BYTES):
        self.app = app
        self.ledger = ledger or UploadLedger()
        self.max_event_bytes = max_event_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        visitor = visitor_of(scope)
        if visitor is None and not path.startswith("/api/"):
            visitor = secrets.token_urlsafe(24)
            send = with_cookie(send, visitor, served_over_https(scope))
        if any(path.startswith(route) for route in FETCH_ROUTES) and fetches_elsewhere(path):
            return await refuse(send, scope, 403, say("not_a_proxy"))
        if scope["method"] == "POST" and path.rstrip("/") == UPLOAD_ROUTE and visitor is not None:
            return await self._record_upload(scope, receive, send, visitor)
        if scope["method"] == "POST" and any(path.startswith(route) for route in EVENT_ROUTES):
            return await self._check_event(scope, receive, send, visitor)
        return await self.app(scope, receive, send)

    async def _record_upload(self, scope, receive, send, visitor: str):
        """Pass the upload through; record the paths of a successful answer for this visitor."""
        answer = {"status": 0, "body": b""}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body" and answer["status"] == 200:
                answer["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    self._record(visitor, answer["body"])
            await send(message)

        await self.app(scope, receive, recording_send)

    def _record(self, visitor: str, body: bytes) -> None:
        try:
            paths = json.loads(body)
        except ValueError:
            return
        if isinstance(paths, list):
            self.ledger.record(visitor, [p for p in paths if isinstance(p, str)])

    async def _check_event(self, scope, receive, send, visitor: str | None):
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_event_bytes:
                return await refuse(send, scope, 413, say("body_too_large", limit=self.max_event_bytes))
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None  # not ours to judge: Gradio answers malformed bodies itself
        foreign = next((p for p in file_paths(data) if not self.ledger.owns(visitor, p)), None)
        if foreign is not None:
            log.warning("%s %s: refused a file this visitor did not upload: %.200s", scope["method"], scope["path"], foreign)
            return await refuse(send, scope, 403, say("file_not_uploaded"))
        await self.app(scope, replay(body, receive), send)


def with_cookie(send, visitor: str, https: bool):
    """``send`` that gives a new visitor its cookie on the response's headers."""
    attributes = "SameSite=None; Secure; Partitioned" if https else "SameSite=Lax"
    cookie = f"{VISITOR_COOKIE}={visitor}; Path=/; HttpOnly; {attributes}".encode()

    async def send_with_cookie(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
        await send(message)

    return send_with_cookie


class BodyGuard:
    """ASGI middleware that bounds every request body as it arrives, before any route reads it.

    * Uploads (``/gradio_api/upload``) may carry ``upload_limit`` bytes in all: Gradio caps
      each file, not their sum, so one request of 40 files of 9 MB was accepted. Past the
      budget the client gets 413 at once, whatever the declared length said.
    * A body whose next piece takes longer than ``read_timeout`` seconds gets 408, so slow
      clients cannot hold connections open forever.

    The guard answers itself and then tells the route that the client has left (an
    ``http.disconnect``), so the route stops reading; anything it still sends is dropped.
    """

    def __init__(self, app, upload_limit: int, read_timeout: float):
        self.app = app
        self.upload_limit = upload_limit
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"].rstrip("/") == UPLOAD_ROUTE else None
        if limit is not None and declared_length(scope) > limit:
            return await refuse(send, scope, 413, say("upload_too_large", limit=megabytes(limit)), close=True)
        state = {"received": 0, "body_done": False, "answered": False, "app_started": False}

        async def guarded_receive():
            if state["answered"]:
                return {"type": "http.disconnect"}
            if state["body_done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:
                return await self.cut_off(send, scope, state, 408, say("body_timeout"))
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
                if limit is not None and state["received"] > limit:
                    return await self.cut_off(send, scope, state, 413, say("upload_too_large", limit=megabytes(limit)))
            return message

        async def guarded_send(message):
            if state["answered"]:
                return
            state["app_started"] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not state["answered"]:
                raise

    async def cut_off(self, send, scope, state, status: int, message: str) -> dict:
        """Answer ``status`` unless the route already answered; the route then sees the client leave."""
        if not state["app_started"]:
            await refuse(send, scope, status, message, close=True)
        state["answered"] = True
        return {"type": "http.disconnect"}


def declared_length(scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def megabytes(size: int) -> str:
    return f"{size / 2**20:.0f} MB"


def replay(body: bytes, receive):
    """A ``receive`` that hands the already-read body to the app once, then the real messages."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def visitor_of(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookie = SimpleCookie()
            try:
                cookie.load(value.decode("latin-1"))
            except Exception:  # a malformed Cookie header is the visitor's problem, not a crash
                return None
            morsel = cookie.get(VISITOR_COOKIE)
            if morsel is not None and 16 <= len(morsel.value) <= 64:
                return morsel.value
    return None


def served_over_https(scope) -> bool:
    forwarded = dict(scope.get("headers", [])).get(b"x-forwarded-proto", b"").decode("latin-1").lower()
    return scope.get("scheme") == "https" or forwarded.split(",")[0].strip() == "https"


def fetches_elsewhere(path: str) -> bool:
    """A file route asked to fetch from another site (``file=http...``) or to proxy."""
    rest = unquote(path.split("=", 1)[1] if "=" in path else path.removeprefix("/gradio_api/file/"))
    return path.startswith("/gradio_api/proxy=") or rest.lower().startswith(("http://", "https://", "//"))


async def refuse(send, scope, status: int, message: str, close: bool = False) -> None:
    """Answer in the JSON API's error shape; ``close`` ends the connection (the body was cut off)."""
    log.info("%s %s -> %d (%s)", scope["method"], scope["path"], status, message)
    body = json.dumps({"error": message, "field": None}, ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
