"""The one queue in front of the GPU: admission, batching, order.

Every generation (the UI, the named API, the JSON API) and every model load goes through one
:class:`GpuGate`. Its rules, each decided under one lock:

* **Admission when a request arrives**, before it joins anything: at most ``slots`` batches run,
  at most ``max_waiting`` requests wait behind them; past that the request is refused at once
  (:class:`QueueFullError`, a 503). A refused request is never computed.
* **Running is not waiting.** A request that joins a batch that has (or is about to take) a free
  slot is running; only requests in batches queued behind a busy GPU count as waiting. So with
  the default queue of 16, the 24 clients of a burst are served: one batch of 8 runs, 16 wait.
* **Batching**: requests with the same key arriving within ``window_s`` of a batch's first one
  share one UNet batch of at most ``max_images`` images (``RAPID_DIFFUSION_BATCH_WINDOW_MS``,
  default 30 ms; 0 turns batching off). A batch closes when its window ends or it is full.
* **Order**: queued batches take free slots in arrival order.
* **Leaving**: a waiting request whose client leaves (``should_stop``) is taken out of its batch
  before the batch starts, so nobody computes it; one in a running batch gets
  :class:`GenerationCancelled` at once (its images are dropped); a batch's denoising loop stops
  only when every member has stopped.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from ..generation.pipeline import GenerationCancelled
from ..generation.request import GenerationRequest
from ..messages import say
from ..settings import settings

POLL_SECONDS = 0.05


class QueueFullError(RuntimeError):
    """More requests are waiting for the GPU than the server accepts."""


@dataclass(eq=False)
class Member:
    """One request in a batch; ``result`` is set when the batch has run."""

    request: GenerationRequest | None
    progress: Callable[[int, int], None] | None = None
    should_stop: Callable[[], bool] | None = None
    result: Any = None

    def stopped(self) -> bool:
        return self.should_stop is not None and self.should_stop()

    @property
    def images(self) -> int:
        return self.request.num_images if self.request is not None else 0


@dataclass(eq=False)
class Batch:
    key: Hashable | None
    members: list[Member] = field(default_factory=list)
    open: bool = True  # still accepting members
    started: bool = False  # holds a slot
    closed: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def images(self) -> int:
        return sum(member.images for member in self.members)

    def stop_all(self) -> bool:
        return all(member.stopped() for member in self.members)

    def report(self, done: int, total: int) -> None:
        for member in self.members:
            if member.progress is not None:
                member.progress(done, total)


Execute = Callable[[list[GenerationRequest], Callable[[int, int], None], Callable[[], bool]], list[Any]]


class GpuGate:
    """At most ``slots`` batches run at once; at most ``max_waiting`` requests wait (None: unbounded).

    ``window_s`` and ``max_images`` default to the settings (``RAPID_DIFFUSION_BATCH_WINDOW_MS``,
    ``RAPID_DIFFUSION_MAX_IMAGES``); ``RAPID_DIFFUSION_CONCURRENCY`` (default one per GPU) and
    ``RAPID_DIFFUSION_QUEUE_SIZE`` (default 16) configure the server's gate, and the UI's Gradio
    queue uses the same numbers.
    """

    def __init__(self, slots: int = 1, max_waiting: int | None = None, window_s: float | None = None,
                 max_images: int | None = None):
        self.slots = slots
        self.max_waiting = max_waiting
        self.window_s = settings().batch_window_ms / 1000 if window_s is None else window_s
        self.max_images = settings().max_images if max_images is None else max_images
        self._free = slots
        self._queue: deque[Batch] = deque()
        self._open: dict[Hashable, Batch] = {}
        self._waiting = 0
        self._lock = threading.Condition()

    @classmethod
    def from_settings(cls) -> "GpuGate":
        current = settings()
        return cls(current.concurrency or max(1, torch.cuda.device_count()), current.queue_size)

    @property
    def waiting(self) -> int:
        """Requests admitted and queued behind a busy GPU (not those running)."""
        with self._lock:
            return self._waiting

    # ------------------------------------------------------------------ the two ways in

    def run(self, key: Hashable | None, member: Member, execute: Execute) -> Any:
        """Admit ``member`` (joining a batch of the same ``key`` when batching is on; ``None``: alone),
        run its batch through ``execute(requests, progress, should_stop)``, return its result."""
        batch, leader = self._admit(key, member)
        if leader:
            self._lead(batch, execute)
        else:
            self._follow(batch, member)
        if member.stopped():
            raise GenerationCancelled(say("stopped"))
        if batch.error is not None:
            raise batch.error
        return member.result

    @contextmanager
    def slot(self, should_stop: Callable[[], bool] | None = None):
        """Hold a slot for work that is not a generation (a model load); queued and bounded alike."""
        batch, _ = self._admit(None, Member(None, should_stop=should_stop))
        self._wait_for_slot(batch)
        try:
            yield
        finally:
            self._release(batch)

    # ------------------------------------------------------------------ admission

    def _admit(self, key: Hashable | None, member: Member) -> tuple[Batch, bool]:
        with self._lock:
            batch = self._open.get(key) if key is not None and self.window_s > 0 else None
            if batch is not None and batch.images + member.images <= self.max_images:
                self._count_in(batch, 1)
                batch.members.append(member)
                if batch.images >= self.max_images:
                    self._close(batch)
                return batch, False
            batch = Batch(key, [member])
            if self._free > 0 and not self._queue:
                self._free -= 1
                batch.started = True
            else:
                self._count_in(batch, 1)
                self._queue.append(batch)
            if key is not None and self.window_s > 0 and member.images < self.max_images:
                self._open[key] = batch
            else:
                batch.open = False
                batch.closed.set()
            return batch, True

    def _count_in(self, batch: Batch, count: int) -> None:
        """Members joining a batch that waits for a slot take waiting places, or are refused."""
        if batch.started:
            return
        if self.max_waiting is not None and self._waiting + count > self.max_waiting:
            raise QueueFullError(f"{self._waiting} requests are already waiting")
        self._waiting += count

    def _close(self, batch: Batch) -> None:
        batch.open = False
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        batch.closed.set()

    # ------------------------------------------------------------------ running

    def _lead(self, batch: Batch, execute: Execute) -> None:
        """The first member's thread: waits out the window and the queue, then runs the batch."""
        batch.closed.wait(self.window_s)
        with self._lock:
            self._close(batch)
        try:
            self._wait_for_slot(batch)
        except GenerationCancelled:
            return  # everyone left before the batch started: nothing to compute
        try:
            if batch.members:
                results = execute([m.request for m in batch.members], batch.report, batch.stop_all)
                for member, result in zip(batch.members, results):
                    member.result = result
        except BaseException as exc:  # handed to every member, each raises it in its own thread
            batch.error = exc
        finally:
            self._release(batch)

    def _wait_for_slot(self, batch: Batch) -> None:
        """Until the batch holds a slot; members who left meanwhile are taken out, not computed."""
        with self._lock:
            while not batch.started:
                self._drop_leavers(batch)
                if not batch.members:
                    self._queue.remove(batch)
                    batch.done.set()
                    raise GenerationCancelled(say("stopped"))
                self._lock.wait(POLL_SECONDS)

    def _drop_leavers(self, batch: Batch) -> None:
        leavers = [m for m in batch.members if m.stopped()]
        for member in leavers:
            batch.members.remove(member)
        self._waiting -= len(leavers)

    def _follow(self, batch: Batch, member: Member) -> None:
        """A member's thread: wait for the batch; leave at once when the client leaves."""
        while not batch.done.wait(POLL_SECONDS):
            if member.stopped():
                with self._lock:
                    if not batch.started and member in batch.members:
                        batch.members.remove(member)
                        self._waiting -= 1
                return

    def _release(self, batch: Batch) -> None:
        with self._lock:
            self._free += 1
            while self._free > 0 and self._queue:
                queued = self._queue.popleft()
                queued.started = True
                self._free -= 1
                self._waiting -= len(queued.members)
            self._lock.notify_all()
        batch.done.set()
