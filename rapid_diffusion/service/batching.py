"""Batching of concurrent requests: same domain and :func:`~rapid_diffusion.generation.pipeline.batch_key` within a window.

The first request of a group waits ``RAPID_DIFFUSION_BATCH_WINDOW_MS`` (default 30 ms; 0 turns
batching off) for others with the same key, then runs the whole group as one UNet batch through
the caller's ``execute`` (which takes the GPU slot). The others wait for their own result.

Cancellation stays per request: a member whose user stops gets :class:`GenerationCancelled` at
once (its images are computed with the batch and dropped); the batch's loop stops only when
every member has stopped. Each member counts as waiting in the caller's queue bound while it
waits (``wait_place``), so batching never lets more requests in than the queue accepts.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, Hashable

from ..generation.pipeline import GenerationCancelled, GenerationResult
from ..generation.request import GenerationRequest

POLL_SECONDS = 0.05


@dataclass
class Member:
    request: GenerationRequest
    progress: Callable[[int, int], None] | None = None
    should_stop: Callable[[], bool] | None = None

    def stopped(self) -> bool:
        return self.should_stop is not None and self.should_stop()


@dataclass
class Group:
    members: list[Member] = field(default_factory=list)
    images: int = 0
    open: bool = True
    done: threading.Event = field(default_factory=threading.Event)
    results: list[GenerationResult] | None = None
    error: BaseException | None = None

    def stop_all(self) -> bool:
        return all(member.stopped() for member in self.members)

    def report(self, done: int, total: int) -> None:
        for member in self.members:
            if member.progress is not None:
                member.progress(done, total)


Execute = Callable[[list[GenerationRequest], Callable[[int, int], None], Callable[[], bool]], list[GenerationResult]]


class Batcher:
    """Groups requests by key for ``window_s`` seconds, up to ``max_images`` images per group."""

    def __init__(self, window_s: float, max_images: int):
        self.window_s = window_s
        self.max_images = max_images
        self._open: dict[Hashable, Group] = {}
        self._lock = threading.Lock()

    def run(
        self,
        key: Hashable,
        member: Member,
        execute: Execute,
        wait_place: Callable[[], AbstractContextManager],
    ) -> GenerationResult:
        group, index, leader = self._join(key, member)
        if leader:
            time.sleep(self.window_s)
            self._close(key, group)
            self._execute(group, execute)
        else:
            with wait_place():
                self._wait(group, member)
        if member.stopped():
            raise GenerationCancelled("generation stopped by the user / 已停止生成")
        if group.error is not None:
            raise group.error
        return group.results[index]

    def _join(self, key: Hashable, member: Member) -> tuple[Group, int, bool]:
        with self._lock:
            group = self._open.get(key)
            leader = group is None or group.images + member.request.num_images > self.max_images
            if leader:
                group = Group()
                self._open[key] = group
            group.members.append(member)
            group.images += member.request.num_images
            return group, len(group.members) - 1, leader

    def _close(self, key: Hashable, group: Group) -> None:
        with self._lock:
            group.open = False
            if self._open.get(key) is group:
                del self._open[key]

    @staticmethod
    def _execute(group: Group, execute: Execute) -> None:
        try:
            group.results = execute([m.request for m in group.members], group.report, group.stop_all)
        except BaseException as exc:  # handed to every member, each raises it in its own thread
            group.error = exc
        finally:
            group.done.set()

    @staticmethod
    def _wait(group: Group, member: Member) -> None:
        while not group.done.wait(POLL_SECONDS):
            if member.stopped():
                return
